"""The models a process serves, by id, each loaded on first use.

Services never hold an engine: they ask ``engines.get(model_id)`` per call
(``None`` = the default model). An entry is a :class:`ModelSettings`; loaded
engines are shared by every registry in the process and keyed by those
settings (tests build many apps, a gunicorn worker builds one: loading the
same model twice would only double memory).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..settings import ModelSettings
from .base import Engine

log = logging.getLogger(__name__)

_LOADED: dict[ModelSettings, Engine] = {}
_LOADED_LOCK = threading.Lock()


def build_engine(ms: ModelSettings) -> Engine:
    """A new engine for these settings (the backend's module is imported only when used)."""
    if ms.backend == "llama":
        from .llama import LlamaEngine

        return LlamaEngine(model_path=ms.path, n_ctx=ms.n_ctx, n_threads=ms.n_threads, n_batch=ms.n_batch,
                           model_name=ms.name, flash_attn=ms.use_flash_attn)
    if ms.backend == "batching":
        from .batching import BatchingEngine

        return BatchingEngine(model_path=ms.path, n_ctx_per_seq=ms.n_ctx, n_threads=ms.n_threads,
                              n_batch=ms.n_batch, n_parallel=ms.n_parallel, max_queue=ms.max_queue,
                              model_name=ms.name, flash_attn=ms.use_flash_attn)
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


class UnknownModel(LookupError):
    """No model of that id is served here."""

    def __init__(self, model_id: str):
        super().__init__(f"no model named {model_id!r}")
        self.model_id = model_id


class _Entry:
    """One model id: its settings, and once loaded (or failed) its engine or error."""

    def __init__(self, settings: ModelSettings):
        self.settings = settings
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        self.lock = threading.Lock()


class EngineRegistry:
    def __init__(self, models: Mapping[str, ModelSettings], default: str,
                 on_load: Callable[[Engine], Any] | None = None):
        if default not in models:
            raise ValueError(f"the default model {default!r} is not among {sorted(models)}")
        self._entries = {name: _Entry(ms) for name, ms in models.items()}
        self.default = default
        self._on_load = on_load

    def _entry(self, model_id: str | None) -> _Entry:
        entry = self._entries.get(model_id or self.default)
        if entry is None:
            raise UnknownModel(str(model_id))
        return entry

    def get(self, model_id: str | None = None) -> Engine:
        """The engine serving ``model_id`` (None: the default), loaded on first use
        (blocking until it is ready). Raises UnknownModel, or the load's error."""
        entry = self._entry(model_id)
        if entry.engine is None:
            with entry.lock:
                if entry.engine is None:
                    try:
                        entry.engine = load_shared(entry.settings)
                        entry.error = None
                    except BaseException as exc:
                        entry.error = exc
                        raise
                    if self._on_load is not None:
                        self._on_load(entry.engine)
        return entry.engine

    def install(self, model_id: str | None, engine: Engine) -> None:
        """Serve ``model_id`` with an engine built elsewhere (embedders, tests)."""
        entry = self._entry(model_id)
        with entry.lock:
            entry.engine, entry.error = engine, None

    def state(self, model_id: str | None = None) -> str:
        """``ready``, ``loading``, ``not loaded`` or ``error: ...`` (never blocks)."""
        entry = self._entry(model_id)
        if entry.engine is not None:
            return "ready"
        if entry.error is not None:
            return f"error: {entry.error}"
        return "loading" if entry.lock.locked() else "not loaded"

    def load_in_background(self) -> None:
        """Start loading every model, so the first calls do not wait for it."""
        def _load(model_id: str) -> None:
            try:
                self.get(model_id)
            except Exception:
                log.exception("model failed to load", extra={"model": model_id})

        for model_id in self._entries:
            threading.Thread(target=_load, args=(model_id,), name=f"model-loader-{model_id}", daemon=True).start()

    def __iter__(self):
        return iter(self._entries)
