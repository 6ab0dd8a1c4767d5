"""HTTP Basic auth glue: Flask-HTTPAuth (via APIFlask, which documents it) in front of
the auth service."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from apiflask import HTTPBasicAuth
from flask import current_app, g

from ..observability import metrics
from ..services import auth as auth_service

log = logging.getLogger(__name__)

REALM = "ML Model API"

basic_auth = HTTPBasicAuth(realm=REALM, description="Your username and password (HTTP Basic).")


@dataclass(frozen=True)
class Principal:
    id: int
    username: str


@basic_auth.verify_password
def _verify(username: str, password: str) -> Principal | None:
    if not username and not password:
        auth_failed("basic", "missing", None)
        return None
    rt = current_app.extensions["model_api"]
    with rt.db.session() as s:
        user = auth_service.authenticate(s, username, password, rt.credentials)
        principal = Principal(user.id, user.username) if user else None
    if principal is None:
        auth_failed("basic", "invalid", username)
    else:
        g.user = principal.username
    return principal


def auth_failed(scheme: str, reason: str, username: str | None) -> None:
    """Log (warning, with the user name and never the password) and count a refused
    request. ``reason``: missing or invalid. Other schemes (API keys) call this too."""
    log.warning("auth failed", extra={"user": username, "auth_scheme": scheme, "reason": reason})
    metrics.auth_failed(scheme, reason)
    g.auth_failure = reason


def current_principal() -> Principal:
    user = basic_auth.current_user
    assert isinstance(user, Principal)
    return user
