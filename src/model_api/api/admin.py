"""``/admin``: the operator's JSON API (users, keys, usage, calls, the audit log).

Every route requires an admin (Basic or Bearer, like everyone else): the role is
checked by Flask-HTTPAuth before the body is even read, so a customer gets the
same bare 403 on every route, valid input or not. Every change writes an audit
row (``services/admin.py``) in the same transaction.
"""

from __future__ import annotations

import uuid

from apiflask import APIBlueprint
from flask import Response, g

from ..services import admin, usage
from ..services.api_keys import NewKey
from . import context
from .admin_schemas import (
    AdminCallsOut,
    AdminCallsQuery,
    AdminKeyIn,
    EventsOut,
    EventsQuery,
    KeyOut,
    KeysOut,
    KeysQuery,
    NewKeyOut,
    UsageOut,
    UsageQuery,
    UserIn,
    UserOut,
    UserPatch,
    UsersOut,
    UsersQuery,
)
from .docs import error_responses
from .errors import api_error
from .security import auth, current_principal

bp = APIBlueprint("admin", __name__, url_prefix="/admin", tag="Admin")

ADMIN = ["admin"]
_D403 = "Not an admin (`forbidden`; the same answer on every admin route)"


def actor() -> admin.Actor:
    return admin.Actor(current_principal().id, g.get("request_id"))


def model_ids(names: list[str] | None) -> list[str] | None:
    """Served ids for the names a client sent (ids or aliases); 400 naming an unknown one."""
    if names is None:
        return None
    served = context.runtime().models.names
    unknown = [n for n in names if n not in served]
    if unknown:  # as the model routes answer an unknown model (nothing is created)
        raise api_error(404, f"the model {unknown[0]!r} does not exist", code="model_not_found",
                        details={"models": [f"unknown model {unknown[0]!r}"]})
    return sorted({served[n] for n in names})


def new_key_view(new: NewKey, row, username: str) -> dict:
    return {**admin.key_view(row, username), "key": new.key}


def usage_reply(query: dict, user_id: int | None = None):
    """The report as JSON, or with ``format=csv`` as a CSV download."""
    rt = context.runtime()
    with rt.db.session() as s:
        rows = usage.report(s, query["group_by"], query.get("since"), query.get("until"), user_id)
    if query["format"] == "csv":
        name = f"usage-by-{query['group_by']}.csv"
        return Response(usage.to_csv(rows, query["group_by"]), mimetype="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})
    return {"group_by": query["group_by"], "since": usage.iso(query.get("since")),
            "until": usage.iso(query.get("until")), "rows": [r.as_dict() for r in rows],
            "totals": usage.totals(rows)}


# --- users ---------------------------------------------------------------------------------

@bp.get("/users")
@bp.auth_required(auth, roles=ADMIN)
@bp.input(UsersQuery, location="query")
@bp.output(UsersOut, description="Users by name, with quota, usage, tokens and last call")
@bp.doc(summary="List users", responses=error_responses(400, 401, 403, d403=_D403))
def list_users(query_data: dict):
    rt = context.runtime()
    limit = query_data["limit"]
    with rt.db.session() as s:
        page = admin.list_users(s, rt.policy, limit, query_data.get("after"), query_data.get("q"))
    return {"users": page, "next_after": page[-1]["username"] if len(page) == limit else None}


@bp.post("/users")
@bp.auth_required(auth, roles=ADMIN)
@bp.input(UserIn, location="json", example={"username": "acme", "password": "a long password", "quota": 1000})
@bp.output(UserOut, status_code=201, description="The user was created")
@bp.doc(summary="Create a user", responses=error_responses(400, 401, 403, 409, d403=_D403,
                                                             d409="The username is taken"))
def create_user(json_data: dict):
    rt = context.runtime()
    with rt.db.session() as s:
        user = admin.create_user(s, actor(), json_data["username"], json_data["password"],
                                 json_data.get("quota"), json_data["admin"])
        return admin.user_view(user, admin.quota.state_of_user(user, rt.policy.default_quota,
                                                               rt.policy.window_seconds)), 201


@bp.patch("/users/<username>")
@bp.auth_required(auth, roles=ADMIN)
@bp.input(UserPatch, location="json", example={"quota": 500, "reset_usage": True})
@bp.output(UserOut, description="The user as changed")
@bp.doc(summary="Change a user", description="Quota (null: back to DEFAULT_QUOTA), reset usage, password, "
        "active, admin. An admin cannot deactivate or demote themselves.",
        responses=error_responses(400, 401, 403, 404, 409, d403=_D403, d409="You cannot deactivate or demote yourself"))
def update_user(username: str, json_data: dict):
    rt = context.runtime()
    with rt.db.session() as s:
        user = admin.update_user(
            s, actor(), username, quota_=json_data.get("quota"),
            clear_quota="quota" in json_data and json_data["quota"] is None,
            reset_usage=json_data.get("reset_usage", False), password=json_data.get("password"),
            active=json_data.get("active"), admin=json_data.get("admin"))
        return admin.user_view(user, admin.quota.state_of_user(user, rt.policy.default_quota, rt.policy.window_seconds))


# --- keys ----------------------------------------------------------------------------------

@bp.get("/keys")
@bp.auth_required(auth, roles=ADMIN)
@bp.input(KeysQuery, location="query")
@bp.output(KeysOut, description="API keys (of one user, or everyone's), oldest first")
@bp.doc(summary="List API keys", responses=error_responses(400, 401, 403, 404, d403=_D403, d404="No such user"))
def list_keys(query_data: dict):
    rt = context.runtime()
    limit = query_data["limit"]
    with rt.db.session() as s:
        user_id = admin.get_user(s, query_data["user"]).id if query_data.get("user") else None
        rows = admin.list_keys(s, user_id, query_data["revoked"], limit, query_data.get("after"))
        page = [admin.key_view(k) for k in rows]
    return {"keys": page, "next_after": page[-1]["id"] if len(page) == limit else None}


@bp.post("/keys")
@bp.auth_required(auth, roles=ADMIN)
@bp.input(AdminKeyIn, location="json", example={"user": "acme", "name": "billing app",
                                                "expires_at": "2027-01-01T00:00:00Z"})
@bp.output(NewKeyOut, status_code=201, description="The key, with its secret shown this once")
@bp.doc(summary="Create an API key", responses=error_responses(400, 401, 403, 404, d403=_D403,
                                                                d404="No such user, or (`model_not_found`) model"))
def create_key(json_data: dict):
    rt = context.runtime()
    ids = model_ids(json_data.get("models"))
    with rt.db.session() as s:
        user = admin.get_user(s, json_data["user"])
        new, row = admin.create_key(s, actor(), user, json_data.get("name"), json_data.get("expires_at"), ids)
        return new_key_view(new, row, user.username), 201


@bp.delete("/keys/<int:key_id>")
@bp.auth_required(auth, roles=ADMIN)
@bp.output(KeyOut, description="The key, now revoked")
@bp.doc(summary="Revoke an API key", description="It is refused (401) from the next request on.",
        responses=error_responses(401, 403, 404, d403=_D403, d404="No such key"))
def revoke_key(key_id: int):
    rt = context.runtime()
    with rt.db.session() as s:
        return admin.key_view(admin.revoke_key(s, actor(), key_id))


# --- usage, calls, audit --------------------------------------------------------------------

@bp.get("/usage")
@bp.auth_required(auth, roles=ADMIN)
@bp.input(UsageQuery, location="query")
@bp.output(UsageOut, description="Calls, outcomes, tokens and model time per group", content_type="application/json")
@bp.doc(summary="Usage report", description="`group_by=user|key|model|day` over `[since, until)`; "
        "`format=csv` answers `text/csv` (a billing export) with the same figures.",
        responses={**error_responses(400, 401, 403, d403=_D403),
                   200: {"content": {"text/csv": {"schema": {"type": "string"}}}}})
def usage_report(query_data: dict):
    return usage_reply(query_data)


@bp.get("/calls")
@bp.auth_required(auth, roles=ADMIN)
@bp.input(AdminCallsQuery, location="query")
@bp.output(AdminCallsOut, description="Calls, newest first")
@bp.doc(summary="Calls of every user (support)",
        responses=error_responses(400, 401, 403, 404, d403=_D403, d404="No such user"))
def list_calls(query_data: dict):
    rt = context.runtime()
    limit = query_data["limit"]
    before = None
    if query_data.get("before"):
        try:
            before = uuid.UUID(query_data["before"])
        except ValueError:
            raise api_error(400, "before must be a UUID", code="invalid_request",
                            details={"before": ["not a valid UUID"]}) from None
    with rt.db.session() as s:
        user_id = admin.get_user(s, query_data["user"]).id if query_data.get("user") else None
        rows = admin.calls(s, limit, user_id=user_id, status=query_data.get("status"),
                           since=query_data.get("since"), before=before)
        page = [call_view(c, name) for c, name in rows]
    return {"calls": page, "next_before": page[-1]["id"] if len(page) == limit else None}


def call_view(c, username: str) -> dict:
    return {"id": str(c.id), "user": username, "api_key_id": c.api_key_id, "kind": c.kind, "state": c.status,
            "model_id": c.model_id, "prompt": c.prompt, "response": c.response, "error": c.error,
            "usage": None if c.completion_tokens is None else {
                "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens},
            "charged": c.charged, "request_id": c.request_id, "created_at": usage.iso(c.created_at),
            "finished_at": usage.iso(c.finished_at)}


@bp.get("/events")
@bp.auth_required(auth, roles=ADMIN)
@bp.input(EventsQuery, location="query")
@bp.output(EventsOut, description="The audit log, newest first")
@bp.doc(summary="Audit log", description="Every change made through `/admin`, `/me/keys`, the console "
        "or the CLI (actor null): who, what, when, from which request id.",
        responses=error_responses(400, 401, 403, d403=_D403))
def list_events(query_data: dict):
    rt = context.runtime()
    limit = query_data["limit"]
    with rt.db.session() as s:
        page = admin.events(s, limit, query_data.get("before"))
    return {"events": page, "next_before": page[-1]["id"] if len(page) == limit else None}
