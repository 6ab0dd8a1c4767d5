"""Authentication glue: HTTP Basic (username + password) or ``Authorization:
Bearer <API key>`` on every model route, via Flask-HTTPAuth's MultiAuth (through
APIFlask, which documents both schemes). Basic is the main scheme, so a request
without credentials is challenged with ``WWW-Authenticate: Basic``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from apiflask import HTTPBasicAuth, HTTPTokenAuth, MultiAuth
from flask import current_app, g, request

from ..observability import metrics
from ..services import access, admin, api_keys
from ..services import auth as auth_service
from ..services import quota
from ..services.auth import USERNAME_MAX, possible_username
from ..services.limits import AccountLimits, Caps
from ..services.quota import QuotaState
from .errors import api_error

log = logging.getLogger(__name__)

REALM = "ML Model API"


def _scheme_of(headers) -> str:
    """The scheme word of the Authorization header, lower-cased ("" if none)."""
    return headers.get("Authorization", "").strip().partition(" ")[0].lower()


class _Scheme:
    """Schemes are case-insensitive (RFC 9110 §11.1): ``basic`` and ``BEARER`` select
    their scheme as ``Basic`` and ``Bearer`` do."""

    scheme: str

    def is_compatible_auth(self, headers) -> bool:
        return _scheme_of(headers) == self.scheme.lower()


class BasicAuth(_Scheme, HTTPBasicAuth):
    """HTTP Basic that reads credentials only from a ``Basic`` header. (Flask-HTTPAuth's
    parser takes the base64 ``user:password`` after *any* scheme word, so ``Foo
    <base64>`` would sign in; here any scheme but Basic and Bearer is no credentials.)"""

    def get_auth(self):
        if _scheme_of(request.headers) != "basic":
            return None
        return super().get_auth()


class TokenAuth(_Scheme, HTTPTokenAuth):
    pass


basic_auth = BasicAuth(realm=REALM, description="Your username and password (HTTP Basic).")
token_auth = TokenAuth(
    scheme="Bearer", realm=REALM,
    description="An API key from `model-api keys create` (`Authorization: Bearer mk-...`).",
)
#: what model routes require: either scheme
auth = MultiAuth(basic_auth, token_auth)


@dataclass(frozen=True)
class Principal:
    id: int
    username: str
    #: the user's quota as read with the credentials: lets a call refuse a user
    #: visibly out of quota before the model starts (the database's atomic
    #: reservation still decides)
    quota: QuotaState | None = None
    #: the model ids this request may use (the user's list narrowed by the key's); None: any
    models: frozenset[str] | None = None
    #: the API key used (None: Basic); recorded on call rows, for usage per key
    api_key_id: int | None = None
    #: the user's and the key's rate, token and concurrency limits, and the key's priority
    limits: AccountLimits = AccountLimits()


@basic_auth.verify_password
def _verify(username: str, password: str) -> Principal | None:
    if not username and not password:
        auth_failed("basic", "missing", None)
        return None
    if not possible_username(username):
        # no such user can exist: refuse without asking the database (which
        # would refuse a NUL character with an error of its own)
        auth_failed("basic", "invalid", username[:USERNAME_MAX])
        return None
    rt = current_app.extensions["model_api"]
    address = request.remote_addr or ""
    wait = rt.login_throttle.wait(username, address)
    if wait:
        # refused before the password is checked: a guesser gets no answer and costs no argon2 work
        auth_failed("basic", "throttled", username)
        raise api_error(429, "too many failed sign-ins; try again later (API keys are not affected)",
                        code="too_many_sign_in_failures", headers={"Retry-After": str(wait)})
    principal = _principal("basic", username,
                           lambda s, rt: auth_service.authenticate(s, username, password, rt.credentials))
    if principal is None:
        rt.login_throttle.failed(username, address)
    return principal


def auth_failed(scheme: str, reason: str, username: str | None) -> None:
    """Log (warning, with the user name and never the password) and count a refused
    request. ``reason``: missing, invalid or throttled. Other schemes (API keys) call this too."""
    log.warning("auth failed", extra={"user": username, "auth_scheme": scheme, "reason": reason})
    metrics.auth_failed(scheme, reason)
    g.auth_failure = reason


@token_auth.verify_token
def _verify_token(token: str) -> Principal | None:
    if not token:
        auth_failed("bearer", "missing", None)
        return None
    # an unknown or revoked key has no user to name, and the key never goes into a log
    return _principal("bearer", None, lambda s, rt: api_keys.authenticate(s, token))


def _principal(scheme: str, name_for_log: str | None, lookup) -> Principal | None:
    """Run a scheme's credential lookup; record the user, or log and count the failure."""
    rt = current_app.extensions["model_api"]
    with rt.db.autocommit() as conn:
        row = lookup(conn, rt)
    if row is None:
        auth_failed(scheme, "invalid", name_for_log)
        return None
    g.user = row.username
    return principal_of(row, rt)


def principal_of(row, rt) -> Principal:
    """The caller an account row (:data:`~..services.auth.ACCOUNT_COLUMNS`, plus the key's if any) describes."""
    key_id = getattr(row, "key_id", None)
    return Principal(row.id, row.username,
                     quota.state_of_user(row, rt.policy.default_quota, rt.policy.window_seconds),
                     access.effective(row.allowed_models, getattr(row, "key_models", None)),
                     key_id,
                     AccountLimits(Caps.of(row), None if key_id is None else Caps.of(row, "key_"),
                                   max(1, row.key_priority or 1) if key_id is not None else 1))


def act_as(principal: Principal) -> None:
    """Make ``principal`` the request's caller, as a successful Basic or Bearer sign-in
    does (the console's session sign-in: its routes then share the API's helpers)."""
    g.user = principal.username
    g.flask_httpauth_user = principal


@basic_auth.get_user_roles
@token_auth.get_user_roles
def _roles(principal: Principal) -> list[str]:
    """``auth_required(auth, roles=["admin"])``: read from the database on each admin
    request (not with the cached credentials), so a demotion takes effect at once."""
    rt = current_app.extensions["model_api"]
    with rt.db.autocommit() as conn:
        return ["admin"] if admin.is_admin(conn, principal.id) else []


def current_principal() -> Principal:
    user = auth.current_user
    assert isinstance(user, Principal)
    return user
