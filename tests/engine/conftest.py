"""Fixtures for the engine tests: the real SmolLM2-135M model, loaded once per module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def llama_engine():
    from model_api.engine.llama import LlamaEngine

    engine = LlamaEngine(n_ctx=2048)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def batching_engine():
    from model_api.engine.batching import BatchingEngine

    engine = BatchingEngine(n_parallel=8, n_ctx_per_seq=2048, max_queue=64)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tiny_engine():
    """One slot, one waiting place: makes queueing and slot reuse observable."""
    from model_api.engine.batching import BatchingEngine

    engine = BatchingEngine(n_parallel=1, n_ctx_per_seq=512, max_queue=1)
    yield engine
    engine.close()
