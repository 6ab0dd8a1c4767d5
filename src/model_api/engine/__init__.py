"""Model engines behind one interface (see :mod:`model_api.engine.base`)."""

from __future__ import annotations

from typing import Any

from .base import Engine

ENGINE_KINDS = ("llama", "batching")


def build_engine(kind: str, **kwargs: Any) -> Engine:
    """Construct the engine named by ``kind`` ("llama" or "batching")."""
    if kind == "llama":
        from .llama import LlamaEngine

        return LlamaEngine(**kwargs)
    if kind == "batching":
        from .batching import BatchingEngine

        return BatchingEngine(**kwargs)
    raise ValueError(f"unknown engine kind {kind!r}; expected one of {ENGINE_KINDS}")
