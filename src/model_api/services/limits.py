"""Fair sharing: requests and tokens per window, calls in flight, token budgets,
per user and per API key (a key's limits apply within its user's).

Rates and concurrency are counted where every process and host sees the same
counts: in ``limits`` storage (RATE_LIMIT_STORAGE_URL; Redis in production,
process memory when unset, so each process then enforces them on its own):

* requests per window: a **moving window** (exact: ``Retry-After`` is when the
  oldest counted request leaves the window), one entry per call;
* tokens per window: a **sliding window counter** (two counters, whatever the
  number of tokens), charged ``prompt + max_tokens`` at admission; when the call
  ends the unused part is given back (a negative hit), so a short reply costs
  what it used;
* calls in flight: a sorted set of slots with an expiry (one atomic script in
  Redis), released when the call ends; a process that dies holding one loses it
  after CONCURRENCY_SLOT_TTL_SECONDS.

Token budgets are money, so they live in the database: reserved with one
conditional UPDATE per row in the transaction that writes the call row (see
:func:`reserve_budget`), settled to the real count in the call's final write
(``ledger.record_completion`` / ``record_failure``), exactly once, like quota
refunds. Only calls a budget applies to reserve anything. A user's budget is
per quota window when QUOTA_WINDOW_SECONDS is set (it renews with the call
quota, in the same UPDATE), lifetime otherwise; a key's is lifetime.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from ..models import ApiKey, User

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caps:
    """One principal's limits; None: no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    token_budget: int | None = None

    @classmethod
    def of(cls, row: Any, prefix: str = "") -> Caps:
        """From a row with ``rpm_limit``... columns (``prefix``: ``key_`` for a key's)."""
        return cls(*(getattr(row, prefix + name, None)
                     for name in ("rpm_limit", "tpm_limit", "concurrency_limit", "token_budget")))

    def over(self, defaults: Caps) -> Caps:
        """These caps, each unset one taken from ``defaults``."""
        return Caps(*(mine if mine is not None else theirs for mine, theirs in zip(
            (self.rpm, self.tpm, self.concurrency, self.token_budget),
            (defaults.rpm, defaults.tpm, defaults.concurrency, defaults.token_budget))))


@dataclass(frozen=True)
class AccountLimits:
    """The limits of a call's caller, read with the credentials: the user's own
    (unset ones from the settings' defaults at admission) and the key's (None: Basic)."""

    user: Caps = Caps()
    key: Caps | None = None
    #: the API key's weight in the fair scheduler
    priority: int = 1


def account_limits(session: Session, user_id: int, api_key_id: int | None) -> AccountLimits:
    """The limits of a user (and key) read from the database: for calls not made
    through a signed-in request (async job settlement, tests, the CLI)."""
    user = session.execute(select(User.rpm_limit, User.tpm_limit, User.concurrency_limit, User.token_budget)
                           .where(User.id == user_id)).first()
    key = None
    if api_key_id is not None:
        key = session.execute(select(ApiKey.rpm_limit, ApiKey.tpm_limit, ApiKey.concurrency_limit,
                                     ApiKey.token_budget, ApiKey.priority).where(ApiKey.id == api_key_id)).first()
    return AccountLimits(Caps.of(user) if user is not None else Caps(),
                         Caps.of(key) if key is not None else None,
                         (key.priority or 1) if key is not None else 1)


@dataclass(frozen=True)
class Window:
    """One group of OpenAI's ``x-ratelimit-*`` headers."""

    limit: int
    remaining: int
    reset_seconds: float


@dataclass(frozen=True)
class RateState:
    """What a model call's reply says about the caller's rate limits (None: no such limit)."""

    requests: Window | None = None
    tokens: Window | None = None


class RateLimited(Exception):
    """Over a request, token or concurrency limit: 429 ``rate_limit_exceeded``.
    ``retry_after`` None: this request can never pass (larger than the token limit)."""

    def __init__(self, what: str, limit: int, retry_after: int | None, state: RateState, whose: str):
        per = "in flight" if what == "concurrency" else "per window"
        super().__init__(f"{whose} limit of {limit} {'calls' if what != 'tokens' else 'tokens'} {per} reached")
        self.what = what
        self.limit = limit
        self.retry_after = retry_after
        self.state = state
        self.whose = whose
        #: the caller's call quota, when known (its X-RateLimit-* headers go on the 429 too)
        self.quota: Any = None


class BudgetExceeded(Exception):
    """The token budget cannot cover this call (prompt + max_tokens): 429 ``insufficient_quota``."""

    def __init__(self, whose: str, budget: int, used: int, asked: int):
        super().__init__(f"the {whose}'s token budget of {budget} has {max(0, budget - used)} tokens left; "
                         f"this call needs up to {asked} (prompt + max_tokens)")
        self.whose = whose
        self.budget = budget
        self.used = used
        self.asked = asked


LIMIT_FIELDS = {"rpm": "rpm_limit", "tpm": "tpm_limit", "concurrency": "concurrency_limit",
                "token_budget": "token_budget"}


def set_limits(row: User | ApiKey, *, clear: tuple[str, ...] = (), reset_tokens: bool = False,
               **values: int | None) -> None:
    """Set a user's or key's limits (``rpm=``, ``tpm=``, ``concurrency=``,
    ``token_budget=``; None: leave as is); ``clear``: names set back to the
    default (a user) or to no narrowing (a key). Raises ValueError on a bad value."""
    for name, value in values.items():
        if name not in LIMIT_FIELDS:
            raise ValueError(f"unknown limit {name!r}")
        if value is None:
            continue
        if value < (0 if name == "token_budget" else 1):
            raise ValueError(f"{name} must be >= {0 if name == 'token_budget' else 1}")
        setattr(row, LIMIT_FIELDS[name], value)
    for name in clear:
        setattr(row, LIMIT_FIELDS[name], None)
    if reset_tokens:
        row.tokens_used = 0


# -- token budgets (database) ------------------------------------------------

def reserve_budget(session: Session, user_id: int, api_key_id: int | None, tokens: int,
                   default_budget: int | None) -> None:
    """Add ``tokens`` to the user's (and key's) ``tokens_used`` if their budgets
    allow it, or raise :class:`BudgetExceeded` (the caller's transaction then
    rolls back: nothing charged). One conditional UPDATE per row: concurrent
    calls from any number of processes can never overspend a budget."""
    budget = User.token_budget if default_budget is None else func.coalesce(User.token_budget, default_budget)
    fits = User.tokens_used + tokens <= budget
    cond = fits if default_budget is not None else or_(User.token_budget.is_(None), fits)
    done = session.execute(update(User).where(User.id == user_id, cond)
                           .values(tokens_used=User.tokens_used + tokens)
                           .execution_options(synchronize_session=False)).rowcount
    if not done:
        row = session.execute(select(budget, User.tokens_used).where(User.id == user_id)).one()
        raise BudgetExceeded("user", int(row[0]), int(row[1]), tokens)
    if api_key_id is None:
        return
    done = session.execute(update(ApiKey).where(
        ApiKey.id == api_key_id,
        or_(ApiKey.token_budget.is_(None), ApiKey.tokens_used + tokens <= ApiKey.token_budget),
    ).values(tokens_used=ApiKey.tokens_used + tokens).execution_options(synchronize_session=False)).rowcount
    if not done:
        row = session.execute(select(ApiKey.token_budget, ApiKey.tokens_used).where(ApiKey.id == api_key_id)).first()
        if row is not None:  # a key deleted meanwhile has no budget to keep
            raise BudgetExceeded("API key", int(row[0]), int(row[1]), tokens)


def settle_budget(conn, user_id: int, api_key_id: int | None, delta: int, reserved_at: datetime) -> None:
    """Add ``delta`` (real tokens minus the reservation: usually negative) to the
    user's and key's ``tokens_used``; run in the transaction of the call's final write.
    A user's budget renews with the quota window (QUOTA_WINDOW_SECONDS): a call
    reserved (``reserved_at``) before the user's current window began was paid for
    in full by the last one, and settles nothing into this one."""
    if delta == 0:
        return
    conn.execute(update(User).where(User.id == user_id, or_(User.window_started_at.is_(None),
                                                            User.window_started_at <= reserved_at))
                 .values(tokens_used=User.tokens_used + delta).execution_options(synchronize_session=False))
    if api_key_id is not None:
        conn.execute(update(ApiKey).where(ApiKey.id == api_key_id)
                     .values(tokens_used=ApiKey.tokens_used + delta).execution_options(synchronize_session=False))


# -- calls in flight ---------------------------------------------------------

_ACQUIRE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return 1
"""


class _RedisSlots:
    """Slots as members of a sorted set scored by their expiry (the Redis server's
    clock, so hosts' clocks need not agree); acquiring drops expired ones first,
    all in one script: two processes can never both take the last slot."""

    def __init__(self, client: Any, ttl: float):
        self._client = client
        self._acquire = client.register_script(_ACQUIRE_SLOT)
        self._ttl = ttl

    def acquire(self, key: str, limit: int, member: str) -> bool:
        return bool(self._acquire(keys=[key], args=[limit, self._ttl, member]))

    def release(self, key: str, member: str) -> None:
        self._client.zrem(key, member)


class _MemorySlots:
    """The same for one process (RATE_LIMIT_STORAGE_URL=memory://)."""

    def __init__(self, ttl: float):
        self._ttl = ttl
        self._slots: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str, limit: int, member: str) -> bool:
        now = time.monotonic()
        with self._lock:
            held = {m: exp for m, exp in self._slots.get(key, {}).items() if exp > now}
            if len(held) >= limit:
                self._slots[key] = held
                return False
            held[member] = now + self._ttl
            self._slots[key] = held
            return True

    def release(self, key: str, member: str) -> None:
        with self._lock:
            self._slots.get(key, {}).pop(member, None)


# -- admission ----------------------------------------------------------------

@dataclass
class _Rule:
    whose: str  # "user" | "API key"
    ident: tuple[str, ...]
    item: RateLimitItem


@dataclass(eq=False)
class Admission:
    """What an admitted call holds until it ends: its token reservation in the
    token windows and its concurrency slots. :meth:`settle` (idempotent) gives
    back what the call did not use and frees the slots."""

    limiter: Limiter | None
    reserved: int = 0
    state: RateState = field(default_factory=RateState)
    _token_rules: list[_Rule] = field(default_factory=list)
    _slots: list[str] = field(default_factory=list)
    _member: str = ""
    _settled: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def settle(self, used_tokens: int = 0) -> None:
        """The call ended having used ``used_tokens`` (prompt + completion; 0 when
        refused or failed through our fault): give back the rest, free the slots."""
        with self._lock:
            if self._settled or self.limiter is None:
                return
            self._settled = True
        try:
            self.limiter._give_back(self._token_rules, self.reserved - max(0, used_tokens))
            for key in self._slots:
                self.limiter._slot_store.release(key, self._member)
        except Exception:  # the storage is down: the windows and slot TTLs forget it anyway
            log.warning("could not settle a call's limits", exc_info=True)


#: an admission that holds nothing (no limit applies, or no limiter)
NOTHING_HELD = Admission(None)


class Limiter:
    """Admits model calls against the caller's request, token and concurrency limits."""

    def __init__(self, storage_url: str, defaults: Caps, window_seconds: int = 60, slot_ttl: float = 900):
        self.defaults = defaults
        self.window = window_seconds
        storage = storage_from_string(storage_url)
        self._requests = MovingWindowRateLimiter(storage)
        self._tokens = SlidingWindowCounterRateLimiter(storage)
        self._storage = storage
        connect = getattr(storage, "get_connection", None)
        if isinstance(storage, MemoryStorage) or connect is None:
            self._slot_store: Any = _MemorySlots(slot_ttl)
        else:
            self._slot_store = _RedisSlots(connect(), slot_ttl)

    def caps(self, limits: AccountLimits) -> tuple[Caps, Caps | None]:
        return limits.user.over(self.defaults), limits.key

    def _rules(self, kind: str, user_id: int, api_key_id: int | None, limits: AccountLimits) -> list[_Rule]:
        user, key = self.caps(limits)
        out = []
        for whose, caps, ident in (("API key", key, ("key", str(api_key_id))), ("user", user, ("user", str(user_id)))):
            amount = None if caps is None else getattr(caps, kind)
            if amount is not None:
                out.append(_Rule(whose, (kind, *ident), RateLimitItemPerSecond(amount, self.window,
                                                                                namespace="model-api")))
        return out

    def admit(self, user_id: int, api_key_id: int | None, limits: AccountLimits, tokens: int, *,
              hold_slot: bool = True) -> Admission:
        """Count one call that may use up to ``tokens`` (prompt + max_tokens)
        against the caller's limits, or raise :class:`RateLimited` with nothing
        counted. ``hold_slot``: the call occupies a concurrency slot until
        :meth:`Admission.settle` (sync and streamed calls; an async job only
        counts against the rates)."""
        requests = self._rules("rpm", user_id, api_key_id, limits)
        token_rules = self._rules("tpm", user_id, api_key_id, limits)
        user, key = self.caps(limits)
        slots = [] if not hold_slot else [
            (whose, f"model-api/concurrency/{ident}", n) for whose, n, ident in (
                ("API key", key.concurrency if key else None, f"key/{api_key_id}"),
                ("user", user.concurrency, f"user/{user_id}")) if n is not None]
        if not (requests or token_rules or slots):
            return NOTHING_HELD
        try:
            return self._admit(requests, token_rules, slots, tokens)
        except RateLimited:
            raise
        except Exception as exc:
            # the counters' storage is unreachable: serve rather than fail every call
            # (token budgets and the quota, in the database, still hold)
            log.warning("rate limit storage unavailable; call admitted without rate limits",
                        extra={"error": type(exc).__name__})
            return NOTHING_HELD

    def _admit(self, requests: list[_Rule], token_rules: list[_Rule], slots: list[tuple[str, str, int]],
               tokens: int) -> Admission:
        for r in token_rules:
            if tokens > r.item.amount:  # no window can ever hold it
                raise RateLimited("tokens", r.item.amount, None, self._state(requests, token_rules), r.whose)
        # cheap tests first: a refused call usually leaves every counter untouched
        for r in requests:
            if not self._requests.test(r.item, *r.ident):
                raise self._refusal("rpm", r, requests, token_rules, 1)
        for r in token_rules:
            if not self._tokens.test(r.item, *r.ident, cost=tokens):
                raise self._refusal("tpm", r, requests, token_rules, tokens)
        held = Admission(self, reserved=tokens, _member=uuid.uuid4().hex)
        try:
            for whose, slot_key, n in slots:
                if not self._slot_store.acquire(slot_key, n, held._member):
                    raise RateLimited("concurrency", n, 1, self._state(requests, token_rules), whose)
                held._slots.append(slot_key)
            for r in token_rules:
                if not self._tokens.hit(r.item, *r.ident, cost=tokens):
                    raise self._refusal("tpm", r, requests, token_rules, tokens)
                held._token_rules.append(r)
            # last, as a moving window's entry cannot be taken back: only a race lost
            # between the test above and here can leave one counted for a refused call
            for r in requests:
                if not self._requests.hit(r.item, *r.ident):
                    raise self._refusal("rpm", r, requests, token_rules, 1)
        except BaseException:
            held.settle(0)  # what was taken so far, given back
            raise
        held.state = self._state(requests, token_rules)
        return held

    def give_back(self, user_id: int, api_key_id: int | None, limits: AccountLimits, tokens: int) -> None:
        """Give ``tokens`` of an earlier reservation back to the token windows (an
        async job's settlement, in whichever process ran it)."""
        try:
            self._give_back(self._rules("tpm", user_id, api_key_id, limits), tokens)
        except Exception:
            log.warning("could not give tokens back to the rate limits", exc_info=True)

    def _give_back(self, rules: list[_Rule], tokens: int) -> None:
        if tokens <= 0:
            return
        for r in rules:
            # never more than the current window holds: a reservation from a window
            # that has passed is not credited to the next one
            _, _, current, _ = self._storage.get_sliding_window(r.item.key_for(*r.ident), r.item.get_expiry())
            back = min(tokens, int(current))
            if back > 0:
                self._storage.acquire_sliding_window_entry(r.item.key_for(*r.ident), r.item.amount,
                                                           r.item.get_expiry(), -back)

    def _refusal(self, kind: str, rule: _Rule, requests: list[_Rule], token_rules: list[_Rule],
                 cost: int) -> RateLimited:
        wait = self._request_wait(rule) if kind == "rpm" else self._token_wait(rule, cost)
        what = "requests" if kind == "rpm" else "tokens"
        return RateLimited(what, rule.item.amount, wait, self._state(requests, token_rules), rule.whose)

    def _request_wait(self, rule: _Rule) -> int:
        reset = self._requests.get_window_stats(rule.item, *rule.ident).reset_time
        return max(1, math.ceil(reset - time.time()))

    def _token_wait(self, rule: _Rule, cost: int) -> int:
        """Seconds until the sliding window can take ``cost`` tokens: the previous
        window's count weighs in proportionally to the time it has left."""
        limit, expiry = rule.item.amount, rule.item.get_expiry()
        prev, prev_ttl, cur, cur_ttl = self._storage.get_sliding_window(rule.item.key_for(*rule.ident), expiry)
        if cur + cost <= limit:  # this window can take it once enough of the previous one fades
            wait = prev_ttl - (limit - cur - cost + 1) * expiry / prev if prev else 0.0
        else:  # only the next window can: this one's count then fades as the previous one did
            wait = max(0.0, cur_ttl - expiry) + (expiry - (limit - cost + 1) * expiry / cur if cur else 0.0)
        return max(1, math.ceil(max(0.0, wait) + 0.01))

    def _state(self, requests: list[_Rule], token_rules: list[_Rule]) -> RateState:
        """The x-ratelimit-* values: of the rule with the least left, per kind."""
        now = time.time()
        req = None
        for r in requests:
            stats = self._requests.get_window_stats(r.item, *r.ident)
            w = Window(r.item.amount, stats.remaining, max(0.0, stats.reset_time - now))
            if req is None or w.remaining < req.remaining:
                req = w
        tok = None
        for r in token_rules:
            expiry = r.item.get_expiry()
            prev, prev_ttl, cur, cur_ttl = self._storage.get_sliding_window(r.item.key_for(*r.ident), expiry)
            used = math.floor(prev * prev_ttl / expiry + cur)
            # until the window is empty again: the current count is forgotten a window after it ends
            reset = cur_ttl if cur else prev_ttl
            w = Window(r.item.amount, max(0, r.item.amount - used), reset)
            if tok is None or w.remaining < tok.remaining:
                tok = w
        return RateState(req, tok)
