"""The simple engine: one ``llama_cpp.Llama`` behind a lock, one request at a time."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import llama_cpp

from .base import Completion, EngineError, Generation, PreparedPrompt, SamplingParams
from .grammar import gbnf
from .local import LocalGGUFEngine, default_model_path, default_threads, load_backends
from .stops import StopMatcher


def _grammar(response_format: str) -> llama_cpp.LlamaGrammar:
    # a fresh object per generation: llama-cpp-python keeps parse state in it
    return llama_cpp.LlamaGrammar.from_string(gbnf(response_format), verbose=False)


class LlamaEngine(LocalGGUFEngine):
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
        flash_attn: bool = True,
    ):
        self.model_path = model_path or default_model_path()
        load_backends()
        self._llm = llama_cpp.Llama(
            model_path=self.model_path,
            n_ctx=n_ctx,
            n_threads=n_threads or default_threads(),
            n_batch=n_batch,
            flash_attn=flash_attn,
            verbose=False,
        )
        self._lock = threading.Lock()
        self._active = 0  # generations made by stream() and not yet finished
        self._active_lock = threading.Lock()
        self._adopt(self._llm._model, model_name)
        self.context_size = self._llm.n_ctx()
        self._closed = False

    def stream(self, prompt: PreparedPrompt, cancel: threading.Event | None = None, *,
               incremental: bool = True) -> Generation:
        if self._closed:
            raise EngineError("engine is closed")
        # the prepared tokens: llama-cpp-python takes them as they are, no second tokenize
        assert prompt.tokens is not None, "a prompt prepared by this engine"
        with self._active_lock:
            self._active += 1
        return _LlamaGeneration(self, prompt.tokens, prompt.params, cancel)

    def in_flight(self) -> int:
        return self._active

    def _ended(self) -> None:
        with self._active_lock:
            self._active -= 1

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
            # response_format: sampling constrained to the JSON (schema) grammar
            grammar=None if p.response_format is None else _grammar(p.response_format),
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
        self._engine._ended()
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
