"""The models a process serves, by id, each loaded on first use.

Services never hold an engine: they ask ``engines.get(model_id)`` per call
(``None`` = the default model). An entry is a :class:`ModelSettings`; loaded
engines are shared by every registry in the process and keyed by those
settings (tests build many apps, a gunicorn worker builds one: loading the
same model twice would only double memory).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..settings import ModelSettings
from .base import Engine, EngineBusy

log = logging.getLogger(__name__)

_LOADED: dict[ModelSettings, Engine] = {}
_LOADED_LOCK = threading.Lock()


def estimate_footprint(ms: ModelSettings) -> int:
    """Bytes a local model takes once loaded: its weights (the GGUF's size, as
    llama.cpp maps them) and its KV cache (f16 K and V for every context cell of
    every sequence, from the model's shape read without loading the weights)."""
    if ms.backend == "openai":
        return 0
    from .local import default_model_path, kv_bytes_per_token

    path = ms.path or default_model_path()
    cells = ms.n_ctx * (ms.n_parallel if ms.backend == "batching" else 1)
    return os.path.getsize(path) + cells * kv_bytes_per_token(path)


def batching_args(ms: ModelSettings) -> dict:
    """BatchingEngine's arguments for these settings (also what bench/bench_passes.py builds)."""
    return dict(model_path=ms.path, n_ctx_per_seq=ms.n_ctx, n_threads=ms.n_threads, n_batch=ms.n_batch,
                n_parallel=ms.n_parallel, max_queue=ms.max_queue, prefill_chunk=ms.prefill_chunk,
                model_name=ms.name, flash_attn=ms.use_flash_attn, scheduler=ms.scheduler)


def build_engine(ms: ModelSettings) -> Engine:
    """A new engine for these settings (the backend's module is imported only when used)."""
    if ms.backend == "llama":
        from .llama import LlamaEngine

        return LlamaEngine(model_path=ms.path, n_ctx=ms.n_ctx, n_threads=ms.n_threads, n_batch=ms.n_batch,
                           model_name=ms.name, flash_attn=ms.use_flash_attn)
    if ms.backend == "batching":
        from .batching import BatchingEngine

        return BatchingEngine(**batching_args(ms))
    if ms.backend == "openai":
        from .remote import OpenAIEngine

        assert ms.base_url  # enforced by ModelSettings
        return OpenAIEngine(ms.base_url, api_key=ms.api_key, model_name=ms.name, context_size=ms.n_ctx,
                            timeout=ms.timeout_seconds, connect_timeout=ms.connect_timeout_seconds)
    raise ValueError(f"MODEL_BACKEND={ms.backend!r} is not available in this build")


def load_shared(ms: ModelSettings) -> Engine:
    """The process's engine for these settings, built on first use."""
    with _LOADED_LOCK:
        engine = _LOADED.get(ms)
        if engine is None:
            engine = _LOADED[ms] = build_engine(ms)
        return engine


class ModelUnavailable(EngineBusy):
    """A model cannot be loaded now: every resident model has requests in flight
    (MODEL_MAX_LOADED) or it would not fit MODEL_MEMORY_LIMIT (503, Retry-After)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(retry_after)
        self.args = (message,)


class UnknownModel(LookupError):
    """No model of that id is served here."""

    def __init__(self, model_id: str):
        super().__init__(f"no model named {model_id!r}")
        self.model_id = model_id


def unload_shared(ms: ModelSettings, engine: Engine) -> None:
    with _LOADED_LOCK:
        if _LOADED.get(ms) is engine:
            del _LOADED[ms]
    engine.close()


@dataclass(frozen=True)
class Residency:
    """How many local models may be resident, and in how much memory."""

    max_loaded: int = 1_000_000
    memory_limit: int | None = None  # bytes; None: no limit
    #: longest a request waits for room (a busy model to go idle) before 503
    wait_seconds: float = 30.0
    #: a model handed out this recently counts as busy (its request may not have reached the engine yet)
    grace_seconds: float = 2.0


class _Entry:
    """One model id: its settings, and once loaded (or failed) its engine or error."""

    def __init__(self, model_id: str, settings: ModelSettings):
        self.id = model_id
        self.settings = settings
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.last_used = 0.0
        self.footprint = 0  # bytes it was charged when loaded
        self.loading = False  # room was made for it and its load runs
        self.unloaded = False  # it was resident and made room for another (it loads again on demand)

    @property
    def local(self) -> bool:
        return self.settings.backend != "openai"


class EngineRegistry:
    def __init__(self, models: Mapping[str, ModelSettings], default: str,
                 on_load: Callable[[str, Engine], Any] | None = None, residency: Residency | None = None,
                 on_unload: Callable[[str], Any] | None = None,
                 load: Callable[[ModelSettings], Engine] | None = None,
                 unload: Callable[[ModelSettings, Engine], None] | None = None,
                 footprint: Callable[[ModelSettings], int] | None = None):
        if default not in models:
            raise ValueError(f"the default model {default!r} is not among {sorted(models)}")
        self._entries = {name: _Entry(name, ms) for name, ms in models.items()}
        self.default = default
        self._on_load = on_load
        self._on_unload = on_unload
        self.residency = residency or Residency()
        self._room = threading.Condition()  # held while choosing what to unload for a load
        # how engines are made and freed: the process-wide shared copies, or (tests) anything
        self._load, self._unload_engine = (load, unload or (lambda _ms, e: e.close())) if load else (
            load_shared, unload_shared)
        self._footprint = footprint or estimate_footprint

    def _entry(self, model_id: str | None) -> _Entry:
        entry = self._entries.get(model_id or self.default)
        if entry is None:
            raise UnknownModel(str(model_id))
        return entry

    def get(self, model_id: str | None = None) -> Engine:
        """The engine serving ``model_id`` (None: the default), loaded on first use
        (blocking until it is ready). Raises UnknownModel, or the load's error."""
        entry = self._entry(model_id)
        entry.last_used = time.monotonic()
        engine = entry.engine
        if engine is None:
            with entry.lock:
                if entry.engine is None:
                    try:
                        if entry.local:
                            self._make_room(entry)
                        entry.engine = self._load(entry.settings)
                        entry.error = None
                    except ModelUnavailable:
                        raise  # nothing wrong with the model: a later request may load it
                    except BaseException as exc:
                        entry.error = exc
                        entry.footprint = 0
                        raise
                    finally:
                        entry.loading = False
                    entry.last_used, entry.unloaded = time.monotonic(), False
                    if self._on_load is not None:
                        self._on_load(entry.id, entry.engine)
                engine = entry.engine
        return engine

    # -- residency: at most max_loaded local models, within memory_limit ---------
    def _make_room(self, entry: _Entry) -> None:
        """Unload least recently used idle local models until ``entry`` fits; wait
        (bounded) for busy ones to go idle; raise ModelUnavailable otherwise."""
        need = self._footprint(entry.settings)
        r = self.residency
        if r.memory_limit is not None and need > r.memory_limit:
            raise ModelUnavailable(f"model {entry.id!r} needs about {need >> 20} MiB, more than "
                                   f"MODEL_MEMORY_LIMIT ({r.memory_limit >> 20} MiB) allows", 60)
        deadline = time.monotonic() + r.wait_seconds
        with self._room:
            while True:
                resident = [e for e in self._entries.values()
                            if e.local and (e.engine is not None or e.loading) and e is not entry]
                used = sum(e.footprint for e in resident)
                fits_count = len(resident) < r.max_loaded
                fits_memory = r.memory_limit is None or used + need <= r.memory_limit
                if fits_count and fits_memory:
                    entry.footprint, entry.loading = need, True
                    return
                idle = sorted((e for e in resident if self._idle(e)), key=lambda e: e.last_used)
                if idle:
                    self._unload(idle[0])
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    why = (f"{len(resident)} models (MODEL_MAX_LOADED) are resident" if not fits_count
                           else f"{used >> 20} MiB of MODEL_MEMORY_LIMIT are taken")
                    raise ModelUnavailable(f"model {entry.id!r} cannot be loaded now: {why} and busy", 5)
                self._room.wait(min(left, 0.25))

    def _idle(self, entry: _Entry) -> bool:
        engine = entry.engine
        return (engine is not None and engine.in_flight() == 0
                and time.monotonic() - entry.last_used >= self.residency.grace_seconds)

    def _unload(self, entry: _Entry) -> None:
        with entry.lock:
            engine, entry.engine, entry.footprint, entry.unloaded = entry.engine, None, 0, True
        if engine is None:
            return
        log.info("unloading idle model", extra={"model": entry.id})
        self._unload_engine(entry.settings, engine)
        if self._on_unload is not None:
            self._on_unload(entry.id)

    def loaded(self) -> list[str]:
        """Ids of the models resident now."""
        return [e.id for e in self._entries.values() if e.engine is not None]

    def install(self, model_id: str | None, engine: Engine) -> None:
        """Serve ``model_id`` with an engine built elsewhere (embedders, tests)."""
        entry = self._entry(model_id)
        with entry.lock:
            entry.engine, entry.error = engine, None

    def state(self, model_id: str | None = None) -> str:
        """``ready``, ``loading``, ``not loaded``, ``unloaded`` (to make room for
        another model; loads again on demand) or ``error: ...`` (never blocks)."""
        entry = self._entry(model_id)
        if entry.engine is not None:
            return "ready"
        if entry.error is not None:
            return f"error: {entry.error}"
        if entry.lock.locked():
            return "loading"
        return "unloaded" if entry.unloaded else "not loaded"

    def peek(self, model_id: str | None = None) -> Engine | None:
        """The model's engine if it is resident (never loads it, nor counts as a use)."""
        return self._entry(model_id).engine

    def load_in_background(self) -> None:
        """Start loading the default model and the remote ones (cheap), so the first
        calls do not wait; other local models load on first use."""
        def _load(model_id: str) -> None:
            try:
                self.get(model_id)
            except Exception:
                log.exception("model failed to load", extra={"model": model_id})

        for model_id, entry in self._entries.items():
            if entry.local and model_id != self.default:
                continue
            threading.Thread(target=_load, args=(model_id,), name=f"model-loader-{model_id}", daemon=True).start()

    def __iter__(self):
        return iter(self._entries)
