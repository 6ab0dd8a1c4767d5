"""Password guessing is slowed down: failed Basic sign-ins are counted per
(account, client address) and per client address, and past a limit the next
attempt is refused with 429 and ``Retry-After`` before the password is even
checked (no argon2 work for the guesser either).

Only failures count (a right password does not reset them: the window
forgets them), and only password sign-ins: an attacker guessing a
customer's password from elsewhere exhausts *their own* (account, address)
allowance, not the customer's, and API keys (Bearer) are never throttled, so
nobody can lock a customer out of key access.

Counters live in ``limits`` storage (Flask-Limiter's): ``memory://`` counts per
process; ``redis://...`` is shared by every process and host.
"""

from __future__ import annotations

import math
import time

from limits import parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter


class LoginThrottle:
    def __init__(self, storage_url: str, per_account: str, per_address: str):
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_url))
        self._per_account = parse_many(per_account)
        self._per_address = parse_many(per_address)

    def _rules(self, username: str, address: str):
        for limit in self._per_account:
            yield limit, ("login", "account", address, username)
        for limit in self._per_address:
            yield limit, ("login", "address", address)

    def wait(self, username: str, address: str) -> int:
        """Seconds until this sign-in may be tried again; 0: it may be now."""
        waits = []
        for limit, key in self._rules(username, address):
            if not self._limiter.test(limit, *key):
                reset = self._limiter.get_window_stats(limit, *key).reset_time
                waits.append(max(1, math.ceil(reset - time.time())))
        return max(waits, default=0)

    def failed(self, username: str, address: str) -> None:
        """Count a failed sign-in."""
        for limit, key in self._rules(username, address):
            self._limiter.hit(limit, *key)
