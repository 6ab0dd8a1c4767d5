"""Which local models stay resident: at most MODEL_MAX_LOADED, within
MODEL_MEMORY_LIMIT, the least recently used idle one unloaded first, never one
with requests in flight. Fake engines stand in for models here (the registry's
logic, fast); tests/api/test_models.py loads real ones."""

from __future__ import annotations

import threading

import pytest

from model_api.engine.base import Engine
from model_api.engine.registry import EngineRegistry, ModelUnavailable, Residency
from model_api.settings import ModelSettings

MiB = 1 << 20


class Model(Engine):
    model_name = "fake"
    context_size = 512

    def __init__(self, ms: ModelSettings):
        self.name, self.busy, self.closed = ms.name, 0, False

    def prepare(self, request):  # pragma: no cover - not called here
        raise NotImplementedError

    def stream(self, prompt, cancel=None, *, incremental=True):  # pragma: no cover
        raise NotImplementedError

    def in_flight(self) -> int:
        return self.busy

    def close(self) -> None:
        self.closed = True


def registry(max_loaded: int = 1, memory: int | None = None, wait: float = 0.0, **sizes: int) -> EngineRegistry:
    """Local models a, b, c (100 MiB each unless given) and a remote one."""
    models = {name: ModelSettings(name=name, backend="llama") for name in ("a", "b", "c")}
    models["remote"] = ModelSettings(name="remote", backend="openai", base_url="http://127.0.0.1:9/v1")
    return EngineRegistry(models, default="a", load=Model,
                          footprint=lambda ms: sizes.get(ms.name, 100) * MiB if ms.backend != "openai" else 0,
                          residency=Residency(max_loaded, None if memory is None else memory * MiB, wait, 0.0))


def test_loading_one_more_unloads_the_least_recently_used_idle_model():
    reg = registry(max_loaded=2)
    a, b = reg.get("a"), reg.get("b")
    reg.get("a")  # a is now the more recently used
    c = reg.get("c")
    assert b.closed and not a.closed and not c.closed
    assert sorted(reg.loaded()) == ["a", "c"]


def test_remote_models_do_not_count():
    reg = registry(max_loaded=1)
    reg.get("a")
    reg.get("remote")
    assert sorted(reg.loaded()) == ["a", "remote"]


def test_a_model_with_requests_in_flight_is_never_unloaded():
    reg = registry(max_loaded=1)
    reg.get("a").busy = 1
    with pytest.raises(ModelUnavailable) as refused:
        reg.get("b")
    assert refused.value.retry_after >= 1 and "busy" in str(refused.value)
    assert reg.loaded() == ["a"] and reg.state("b") == "not loaded"  # b may load later: not an error


def test_a_request_waits_for_a_busy_model_to_go_idle_then_loads():
    reg = registry(max_loaded=1, wait=30)
    a = reg.get("a")
    a.busy = 1
    got: list[Engine] = []
    waiter = threading.Thread(target=lambda: got.append(reg.get("b")))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not a.closed  # still waiting
    a.busy = 0
    waiter.join(10)
    assert got and a.closed and reg.loaded() == ["b"]


def test_memory_limit_unloads_idle_models_to_make_room():
    reg = registry(max_loaded=10, memory=250, c=120)
    a, b = reg.get("a"), reg.get("b")  # 200 MiB
    reg.get("c")  # 320 > 250: a, the least recent, goes
    assert a.closed and not b.closed and sorted(reg.loaded()) == ["b", "c"]


def test_a_model_larger_than_the_memory_limit_is_refused_clearly():
    reg = registry(max_loaded=10, memory=250, c=300)
    with pytest.raises(ModelUnavailable, match="MODEL_MEMORY_LIMIT"):
        reg.get("c")
    assert reg.loaded() == []


def test_concurrent_loads_never_exceed_the_limit():
    reg = registry(max_loaded=2, wait=5)
    errors: list[BaseException] = []
    peak = []

    def use(name: str) -> None:
        try:
            for _ in range(50):
                reg.get(name)
                peak.append(len([m for m in reg.loaded() if m != "remote"]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=use, args=(n,)) for n in "abcabc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and max(peak) <= 2
