"""Authentication glue: HTTP Basic (username + password) or ``Authorization:
Bearer <API key>`` on every model route, via Flask-HTTPAuth's MultiAuth (through
APIFlask, which documents both schemes). Basic is the main scheme, so a request
without credentials is challenged with ``WWW-Authenticate: Basic``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from apiflask import HTTPBasicAuth, HTTPTokenAuth, MultiAuth
from flask import current_app, g

from ..observability import metrics
from ..services import access, api_keys
from ..services import auth as auth_service
from ..services import quota
from ..services.quota import QuotaState

log = logging.getLogger(__name__)

REALM = "ML Model API"

basic_auth = HTTPBasicAuth(realm=REALM, description="Your username and password (HTTP Basic).")
token_auth = HTTPTokenAuth(
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


@basic_auth.verify_password
def _verify(username: str, password: str) -> Principal | None:
    if not username and not password:
        auth_failed("basic", "missing", None)
        return None
    return _principal("basic", username,
                      lambda s, rt: auth_service.authenticate(s, username, password, rt.credentials))


def auth_failed(scheme: str, reason: str, username: str | None) -> None:
    """Log (warning, with the user name and never the password) and count a refused
    request. ``reason``: missing or invalid. Other schemes (API keys) call this too."""
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
    return Principal(row.id, row.username,
                     quota.state_of_user(row, rt.policy.default_quota, rt.policy.window_seconds),
                     access.effective(row.allowed_models, getattr(row, "key_models", None)))


def current_principal() -> Principal:
    user = auth.current_user
    assert isinstance(user, Principal)
    return user
