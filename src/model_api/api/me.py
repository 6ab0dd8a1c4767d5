"""``/me``: a customer's own account: quota, usage, API keys. Nobody else's:
another user's key id is answered like a missing one (404)."""

from __future__ import annotations

from apiflask import APIBlueprint

from ..services import admin
from . import context
from .admin import actor, model_ids, new_key_view, usage_reply
from .admin_schemas import KeyIn, KeyOut, KeysOut, MeOut, MeUsageQuery, NewKeyOut, UsageOut
from .docs import error_responses
from .errors import api_error
from .security import auth, current_principal

bp = APIBlueprint("me", __name__, url_prefix="/me", tag="Account")


@bp.get("")
@bp.auth_required(auth)
@bp.output(MeOut, description="Your account: quota used and left, and when its window renews")
@bp.doc(summary="Your account", responses=error_responses(401))
def me():
    rt = context.runtime()
    with rt.db.session() as s:
        return admin.me(s, current_principal().id, rt.policy)


@bp.get("/usage")
@bp.auth_required(auth)
@bp.input(MeUsageQuery, location="query")
@bp.output(UsageOut, description="Your calls, outcomes, tokens and model time per group")
@bp.doc(summary="Your usage", description="The figures of `GET /admin/usage`, of your calls only; "
        "`group_by=key|model|day`, `format=csv`.",
        responses={**error_responses(400, 401), 200: {"content": {"text/csv": {"schema": {"type": "string"}}}}})
def my_usage(query_data: dict):
    return usage_reply(query_data, current_principal().id)


@bp.get("/keys")
@bp.auth_required(auth)
@bp.output(KeysOut, description="Your API keys that are not revoked, oldest first")
@bp.doc(summary="Your API keys", responses=error_responses(401))
def my_keys():
    rt = context.runtime()
    with rt.db.session() as s:
        rows = admin.list_keys(s, current_principal().id, limit=1000)
        return {"keys": [admin.key_view(k) for k in rows], "next_after": None}


@bp.post("/keys")
@bp.auth_required(auth)
@bp.input(KeyIn, location="json", example={"name": "my app"})
@bp.output(NewKeyOut, status_code=201, description="The key, with its secret shown this once")
@bp.doc(summary="Create an API key", description="A key made with a key limited to some models is "
        "limited to them too.", responses=error_responses(400, 401, 403, 404, d404="An unknown model "
                                                          "(`model_not_found`); nothing is created"))
def create_my_key(json_data: dict):
    rt = context.runtime()
    principal = current_principal()
    ids = model_ids(json_data.get("models"))
    if principal.api_key_id is not None and principal.models is not None:
        # a key limited to some models must not mint a key that is not
        if ids is None:
            ids = sorted(principal.models)
        elif not set(ids) <= principal.models:
            raise api_error(403, "the key you signed in with may not grant these models",
                            code="model_not_allowed", details={"models": sorted(set(ids) - principal.models)})
    with rt.db.session() as s:
        user = s.get(admin.User, principal.id)
        new, row = admin.create_key(s, actor(), user, json_data.get("name"), json_data.get("expires_at"), ids)
        return new_key_view(new, row, user.username), 201


@bp.delete("/keys/<int:key_id>")
@bp.auth_required(auth)
@bp.output(KeyOut, description="The key, now revoked")
@bp.doc(summary="Revoke one of your API keys", responses=error_responses(401, 404, d404="No such key of yours"))
def revoke_my_key(key_id: int):
    rt = context.runtime()
    with rt.db.session() as s:
        return admin.key_view(admin.revoke_key(s, actor(), key_id, owner_id=current_principal().id))
