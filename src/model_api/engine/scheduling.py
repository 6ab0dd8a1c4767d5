"""The order in which waiting work is served: the batching engine's wait queue
(who gets the next free sequence slot) and the in-process job executor's.

``fifo`` serves in arrival order: one client with a burst of requests makes
everyone else wait behind all of it. ``fair`` serves tenants (users) in turn,
by deficit round robin: each tenant with work waiting gets ``weight`` items
per round (an API key's priority; 1 by default), so a newcomer waits for at
most one turn of each other tenant, whatever their backlog.

Both are plain data structures without locks: their owner holds its own.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, Literal, TypeVar

from .base import Tenant

T = TypeVar("T")

Scheduler = Literal["fair", "fifo"]


def tenant_key(tenant: Tenant | None, item: Any) -> Hashable:
    """Work without a tenant is a tenant of its own."""
    return tenant.key if tenant is not None else ("untenanted", id(item))


class FifoQueue(Generic[T]):
    """First come, first served (the order before fair scheduling)."""

    fair = False

    def __init__(self) -> None:
        self._items: collections.deque[tuple[T, Hashable]] = collections.deque()

    def push(self, item: T, tenant: Tenant | None = None) -> None:
        self._items.append((item, tenant_key(tenant, item)))

    def pop(self, may_serve: Callable[[Hashable], bool] | None = None) -> T | None:
        """The next item (``may_serve`` is not consulted: arrival order only)."""
        return self._items.popleft()[0] if self._items else None

    def remove(self, item: T) -> None:
        for i, (it, _) in enumerate(self._items):
            if it is item:
                del self._items[i]
                return
        raise ValueError("not queued")

    def waiting(self, key: Hashable) -> int:
        return sum(1 for _, k in self._items if k == key)

    def drain(self) -> list[T]:
        items = [it for it, _ in self._items]
        self._items.clear()
        return items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter([it for it, _ in self._items])


class FairQueue(Generic[T]):
    """Deficit round robin over tenants, one unit of cost per item.

    Tenants with work waiting form a ring. The tenant at the front is credited
    its weight when its turn begins and is served while its credit lasts; then
    the next tenant's turn begins. A tenant whose queue empties leaves the ring
    (and its leftover credit: no saving up turns while idle); a new one joins
    at the back, so it is served after at most one turn of each other tenant.
    """

    fair = True

    def __init__(self) -> None:
        self._queues: dict[Hashable, collections.deque[tuple[T, int]]] = {}
        self._ring: collections.deque[Hashable] = collections.deque()
        self._credit: dict[Hashable, float] = {}
        self._n = 0

    def push(self, item: T, tenant: Tenant | None = None) -> None:
        key = tenant_key(tenant, item)
        weight = max(1, tenant.weight) if tenant is not None else 1
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = collections.deque()
            self._ring.append(key)
            self._credit[key] = 0.0
        q.append((item, weight))
        self._n += 1

    def pop(self, may_serve: Callable[[Hashable], bool] | None = None) -> T | None:
        """The next item in turn, skipping tenants ``may_serve`` refuses now (they
        keep their place); None when none may be served."""
        for _ in range(2 * len(self._ring) + 1):
            if not self._ring:
                return None
            key = self._ring[0]
            if may_serve is not None and not may_serve(key):
                self._ring.rotate(-1)
                continue
            q = self._queues[key]
            if self._credit[key] < 1:  # its turn begins
                self._credit[key] += q[0][1]
            item, _ = q.popleft()
            self._credit[key] -= 1
            self._n -= 1
            if not q:
                self._forget(key)
            elif self._credit[key] < 1:  # its turn is over
                self._ring.rotate(-1)
            return item
        return None

    def _forget(self, key: Hashable) -> None:
        del self._queues[key]
        del self._credit[key]
        self._ring.remove(key)

    def remove(self, item: T) -> None:
        for key, q in self._queues.items():
            for i, (it, _) in enumerate(q):
                if it is item:
                    del q[i]
                    self._n -= 1
                    if not q:
                        self._forget(key)
                    return
        raise ValueError("not queued")

    def waiting(self, key: Hashable) -> int:
        q = self._queues.get(key)
        return len(q) if q is not None else 0

    def drain(self) -> list[T]:
        items = [it for q in self._queues.values() for it, _ in q]
        self._queues.clear()
        self._ring.clear()
        self._credit.clear()
        self._n = 0
        return items

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[T]:
        return iter([it for q in self._queues.values() for it, _ in q])


def make_queue(scheduler: Scheduler) -> FairQueue | FifoQueue:
    if scheduler == "fair":
        return FairQueue()
    if scheduler == "fifo":
        return FifoQueue()
    raise ValueError(f"unknown scheduler {scheduler!r} (fair or fifo)")
