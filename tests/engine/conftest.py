"""Fixtures for the engine tests: the real SmolLM2-135M model, loaded once per module.

Most engine tests compare texts (one engine against the other, alone against
batched, a cached prefix against none), which only the determinism mode
promises: those engines run with flash attention off, as MODEL_DETERMINISTIC=1
builds them. ``fast_batching_engine`` is what `make run` builds by default."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def llama_engine():
    from model_api.engine.llama import LlamaEngine

    engine = LlamaEngine(n_ctx=2048, flash_attn=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def batching_engine():
    from model_api.engine.batching import BatchingEngine

    # 128-token prompt chunks (the default is a whole batch): a long prompt is read
    # in several chunks while other sequences generate, which the identical-text tests need
    engine = BatchingEngine(n_parallel=8, n_ctx_per_seq=2048, max_queue=64, flash_attn=False, prefill_chunk=128)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tiny_engine():
    """One slot, one waiting place: makes queueing and slot reuse observable."""
    from model_api.engine.batching import BatchingEngine

    engine = BatchingEngine(n_parallel=1, n_ctx_per_seq=512, max_queue=1, flash_attn=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def fast_batching_engine():
    """The default engine: flash attention on, no bit-identical promise."""
    from model_api.engine.batching import BatchingEngine

    engine = BatchingEngine(n_parallel=8, n_ctx_per_seq=2048, max_queue=64)
    yield engine
    engine.close()
