"""Who is served next: users in turn (deficit round robin, weighted), in the
queue structure itself, the in-process job executor and the real batching engine."""

from __future__ import annotations

import threading

import pytest

from model_api.engine.base import EngineBusy, GenerationRequest, SamplingParams, Tenant
from model_api.engine.scheduling import FairQueue, FifoQueue, make_queue
from model_api.executor import InProcessExecutor


def _fill(queue, *items: str) -> None:
    """``"a1"`` is tenant ``a``'s first item."""
    for item in items:
        queue.push(item, Tenant(item[0]))


def _drain(queue, may_serve=None) -> list[str]:
    out = []
    while (item := queue.pop(may_serve)) is not None:
        out.append(item)
    return out


def test_a_burst_from_one_user_does_not_delay_another_beyond_one_turn():
    q = FairQueue()
    _fill(q, "a1", "a2", "a3", "a4", "b1", "c1")
    assert _drain(q) == ["a1", "b1", "c1", "a2", "a3", "a4"]


def test_fifo_serves_in_arrival_order():
    q = FifoQueue()
    _fill(q, "a1", "a2", "a3", "b1")
    assert _drain(q) == ["a1", "a2", "a3", "b1"]


def test_a_weight_is_that_many_turns_per_round():
    q = FairQueue()
    for i in range(4):
        q.push(f"a{i}", Tenant("a", weight=3))
    for i in range(4):
        q.push(f"b{i}", Tenant("b"))
    assert _drain(q) == ["a0", "a1", "a2", "b0", "a3", "b1", "b2", "b3"]


def test_an_idle_user_saves_no_turns_for_later():
    q = FairQueue()
    _fill(q, "a1", "b1")
    assert q.pop() == "a1"
    assert q.pop() == "b1"  # a's queue emptied: it left the ring with nothing banked
    _fill(q, "b2", "b3", "a2")
    assert _drain(q) == ["b2", "a2", "b3"]


def test_a_user_that_may_not_be_served_now_keeps_its_place():
    q = FairQueue()
    _fill(q, "a1", "a2", "b1", "b2")
    assert _drain(q, may_serve=lambda key: key != "a") == ["b1", "b2"]
    assert len(q) == 2 and q.waiting("a") == 2
    assert _drain(q) == ["a1", "a2"]


def test_removed_and_drained_items_leave_no_trace():
    q = FairQueue()
    _fill(q, "a1", "b1", "b2")
    q.remove("a1")
    assert q.waiting("a") == 0 and list(q) == ["b1", "b2"]
    with pytest.raises(ValueError):
        q.remove("a1")
    assert sorted(q.drain()) == ["b1", "b2"] and len(q) == 0 and q.pop() is None


def test_work_without_a_tenant_is_a_tenant_of_its_own():
    q = FairQueue()
    q.push("x")
    q.push("y")
    _fill(q, "a1", "a2")
    assert _drain(q) == ["x", "y", "a1", "a2"]


def test_an_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match="fair or fifo"):
        make_queue("lifo")  # type: ignore[arg-type]


@pytest.mark.parametrize("scheduler, light_at", [("fair", 2), ("fifo", 5)])
def test_the_job_executor_takes_users_jobs_in_turn(scheduler, light_at):
    order: list[str] = []
    release = threading.Event()
    done = threading.Event()

    def run(job: str) -> None:
        order.append(job)
        if job == "h0":
            release.wait(10)  # the one worker is busy while the queue fills
        if len(order) == 6:
            done.set()

    executor = InProcessExecutor(run, workers=1, scheduler=scheduler)
    try:
        executor.enqueue_for("h0", 1)
        while not order:
            threading.Event().wait(0.01)
        for i in range(1, 5):
            executor.enqueue_for(f"h{i}", 1)
        executor.enqueue_for("light", 2)
        release.set()
        assert done.wait(10)
        assert order.index("light") == light_at, order
    finally:
        executor.shutdown()


# -- the real engine ----------------------------------------------------------

def _req(tenant: str, max_tokens: int, engine) -> object:
    # a raw counting prompt: the model keeps counting rather than stopping early
    request = GenerationRequest(prompt="1, 2, 3, 4, 5, 6, 7, 8,", tenant=Tenant(tenant),
                                params=SamplingParams(max_tokens=max_tokens, temperature=0))
    return engine.stream(engine.prepare(request))


def _started(gen) -> object:
    next(gen)  # its first text: it holds a slot
    return gen


@pytest.fixture(scope="module", params=["fair", "fifo"])
def two_slots(request):
    from model_api.engine.batching import BatchingEngine

    engine = BatchingEngine(n_parallel=2, n_ctx_per_seq=512, max_queue=4, scheduler=request.param)
    engine.ACTIVE_SECONDS = 0.5  # how long the slot kept for others waits for them: short, for the test
    yield engine
    engine.close()


def _first_delta_order(gens: dict[str, object]) -> list[str]:
    """The names in the order their first text arrived (each read on its own thread)."""
    order: list[str] = []
    lock = threading.Lock()

    def read(name, gen):
        next(gen)
        with lock:
            order.append(name)
        for _ in gen:
            pass

    threads = [threading.Thread(target=read, args=item) for item in gens.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return order


def test_a_light_user_gets_the_next_free_slot_ahead_of_a_heavy_users_queue(two_slots):
    freed = _started(_req("heavy", 300, two_slots))  # closed below: its slot is the next to free
    busy = _started(_req("heavy", 300, two_slots))  # holds the other slot meanwhile
    queued = {"heavy-3": _req("heavy", 6, two_slots), "heavy-4": _req("heavy", 6, two_slots)}
    light = _req("light", 4, two_slots)
    freed.close()
    order = _first_delta_order({**queued, "light": light})
    busy.close()
    if two_slots.info()["scheduler"] == "fair":
        assert order[0] == "light", order
    else:  # first come, first served: the light user waits behind the heavy user's queue
        assert order == ["heavy-3", "heavy-4", "light"], order


@pytest.mark.parametrize("two_slots", ["fair"], indirect=True)
def test_one_user_cannot_fill_the_whole_wait_queue(two_slots):
    running = [_started(_req("heavy", 300, two_slots)) for _ in range(2)]
    waiting = [_req("heavy", 4, two_slots) for _ in range(2)]  # half of max_queue=4
    try:
        with pytest.raises(EngineBusy):
            _req("heavy", 4, two_slots)
        waiting.append(_req("light", 4, two_slots))  # another user still finds room
    finally:
        for gen in running + waiting:
            gen.close()
