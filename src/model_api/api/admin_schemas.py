"""Schemas of ``/admin`` and ``/me`` (they validate input and write the OpenAPI document)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from apiflask import Schema
from apiflask.fields import Dict, Integer, List, Nested
from apiflask.validators import Length, OneOf, Range
from marshmallow import EXCLUDE, ValidationError, fields

from ..services.usage import GROUPS
from .schemas import Boolean, String, WholeNumber, check_text

#: the largest quota an operator may set (PostgreSQL's integer column)
MAX_QUOTA = 2**31 - 1


class When(fields.Field):
    """An ISO 8601 date (``2026-11-01``, midnight UTC) or date-time (``...T12:00:00Z``;
    without an offset: UTC). Loads as an aware datetime."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        if not isinstance(value, str) or not 8 <= len(value) <= 40:
            raise ValidationError("must be an ISO 8601 date or date-time, e.g. 2026-11-01 or 2026-11-01T12:00:00Z")
        check_text(value)
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValidationError("must be an ISO 8601 date or date-time, e.g. 2026-11-01 or "
                                  "2026-11-01T12:00:00Z") from None
        try:
            return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        except OverflowError:  # an offset that takes year 1 or 9999 out of range
            raise ValidationError("must be between the years 1 and 9999") from None

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return value if value is None or isinstance(value, str) else value.isoformat()


_WHEN = {"type": "string", "anyOf": [{"format": "date"}, {"format": "date-time"}], "example": "2026-11-01"}


class _Strict(Schema):
    class Meta:
        unknown = EXCLUDE


class Range_(Schema):
    # an empty range (until before since) is no error: nothing happened in it
    since = When(metadata={**_WHEN, "description": "From this date or date-time (UTC), inclusive."})
    until = When(metadata={**_WHEN, "description": "Up to this date or date-time (UTC), exclusive."})


class UsageQuery(Range_, _Strict):
    group_by = String(load_default="day", validate=OneOf(GROUPS),
                      metadata={"description": "`user`, `key`, `model` or `day` (UTC)."})
    format = String(load_default="json", validate=OneOf(["json", "csv"]),
                    metadata={"description": "`csv`: the same figures as a CSV file (for billing)."})


class MeUsageQuery(UsageQuery):
    group_by = String(load_default="day", validate=OneOf([g for g in GROUPS if g != "user"]),
                      metadata={"description": "`key`, `model` or `day` (UTC)."})


class UsageRowOut(Schema):
    group = String(allow_none=True, metadata={
        "description": "The user id, key id, model id or day (null: calls without a key or a model)."})
    label = String(metadata={"description": "Username, key prefix (and name), model id or day."})
    calls = Integer(metadata={"description": "Calls made (every state)."})
    completed = Integer()
    failed = Integer()
    refunded = Integer(metadata={"description": "Calls whose quota unit was given back."})
    prompt_tokens = Integer()
    completion_tokens = Integer()
    model_seconds = fields.Float(metadata={"description": "Time the model spent on these calls."})


class UsageOut(Schema):
    group_by = String()
    since = String(allow_none=True)
    until = String(allow_none=True)
    rows = List(Nested(UsageRowOut), required=True)
    totals = Dict(metadata={"description": "Every figure summed over the rows."})


class QuotaOut(Schema):
    limit = Integer()
    used = Integer()
    remaining = Integer()
    custom = Boolean(metadata={"description": "Set for this user (false: DEFAULT_QUOTA)."})
    window_seconds = Integer(allow_none=True, metadata={"description": "QUOTA_WINDOW_SECONDS; null: a lifetime allowance."})
    renews_at = String(allow_none=True, metadata={"description": "When the quota window renews (null: no window running)."})


class UserOut(Schema):
    username = String()
    admin = Boolean()
    active = Boolean()
    quota = Nested(QuotaOut)
    calls = Integer()
    tokens = Integer(metadata={"description": "Prompt plus completion tokens of all their calls."})
    last_call_at = String(allow_none=True)
    models = List(String(), allow_none=True)
    limits = Dict(metadata={"description": "Rate and token limits (read-only here)."})
    created_at = String()


class UsersQuery(_Strict):
    limit = Integer(load_default=50, validate=Range(min=1, max=200))
    after = String(validate=Length(max=150), metadata={"description": "Cursor: the `next_after` of the previous page."})
    # short, so a URL with both it and a full-length cursor stays within a request line (4 KB)
    q = String(validate=Length(max=50), metadata={"description": "Only usernames containing this."})


class UserItemOut(UserOut):
    """One user of a listing (its own name in the document: a schema is added once)."""


class UsersOut(Schema):
    users = List(Nested(UserItemOut), required=True)
    next_after = String(allow_none=True)


class UserIn(_Strict):
    username = String(required=True, validate=Length(min=1, max=150))
    password = String(required=True, validate=Length(min=8, max=1024))
    quota = WholeNumber(strict=True, allow_none=True, validate=Range(min=0, max=MAX_QUOTA),
                        metadata={"description": "Model calls allowed; null or absent: DEFAULT_QUOTA."})
    admin = Boolean(load_default=False)


class UserPatch(_Strict):
    quota = WholeNumber(strict=True, allow_none=True, validate=Range(min=0, max=MAX_QUOTA),
                        metadata={"description": "New quota; null: back to DEFAULT_QUOTA."})
    reset_usage = Boolean(metadata={"description": "Set the calls used so far back to 0."})
    password = String(validate=Length(min=8, max=1024))
    active = Boolean(metadata={"description": "false: the user can no longer sign in (calls kept)."})
    admin = Boolean()  # an empty PATCH changes nothing (and writes no audit row)


class KeyIn(_Strict):
    name = String(allow_none=True, validate=Length(max=100), metadata={"description": "A label."})
    expires_at = When(allow_none=True, metadata={**_WHEN, "description": "Refused (401) from then on; null: never."})
    models = List(String(validate=Length(min=1, max=255)), allow_none=True, validate=Length(max=100),
                  metadata={"description": "Model ids (or aliases) the key may call, within its user's; null: no narrowing."})


class AdminKeyIn(KeyIn):
    user = String(required=True, validate=Length(min=1, max=150))


class KeyOut(Schema):
    id = Integer()
    user = String()
    name = String(allow_none=True)
    prefix = String()
    state = String(metadata={"description": "`active`, `expired` or `revoked`."})
    models = List(String(), allow_none=True)
    created_at = String()
    last_used_at = String(allow_none=True)
    expires_at = String(allow_none=True)
    revoked_at = String(allow_none=True)
    limits = Dict()


class NewKeyOut(KeyOut):
    key = String(required=True, metadata={"description": "The secret: shown this once, never again."})


class KeysQuery(_Strict):
    user = String(validate=Length(min=1, max=150))
    revoked = fields.Boolean(load_default=False, metadata={"description": "Include revoked keys."})
    limit = Integer(load_default=100, validate=Range(min=1, max=500))
    after = Integer(validate=Range(min=0, max=MAX_QUOTA), metadata={"description": "Cursor: the last id of the previous page."})


class KeyItemOut(KeyOut):
    """One key of a listing."""


class KeysOut(Schema):
    keys = List(Nested(KeyItemOut), required=True)
    next_after = Integer(allow_none=True)


class EventsQuery(_Strict):
    limit = Integer(load_default=50, validate=Range(min=1, max=500))
    before = Integer(validate=Range(min=0, max=MAX_QUOTA), metadata={"description": "Cursor: the `next_before` of the previous page."})


class EventOut(Schema):
    id = Integer()
    at = String()
    actor = String(allow_none=True, metadata={"description": "Who made the change (null: the CLI)."})
    action = String(metadata={"example": "user.update"})
    target = String(allow_none=True)
    detail = Dict(allow_none=True)
    request_id = String(allow_none=True)


class EventsOut(Schema):
    events = List(Nested(EventOut), required=True)
    next_before = Integer(allow_none=True)


class AdminCallsQuery(_Strict):
    user = String(validate=Length(min=1, max=150))
    status = String(validate=OneOf(["queued", "running", "completed", "failed", "cancelled"]))
    since = When(metadata=_WHEN)
    limit = Integer(load_default=50, validate=Range(min=1, max=200))
    before = String(validate=Length(max=36),
                    metadata={"description": "Cursor: the `next_before` of the previous page.", "format": "uuid"})


class AdminCallOut(Schema):
    id = String()
    user = String()
    api_key_id = Integer(allow_none=True)
    kind = String()
    state = String()
    model_id = String(allow_none=True)
    prompt = String()
    response = String(allow_none=True)
    error = String(allow_none=True)
    usage = Dict(allow_none=True)
    charged = Boolean()
    request_id = String(allow_none=True)
    created_at = String()
    finished_at = String(allow_none=True)


class AdminCallsOut(Schema):
    calls = List(Nested(AdminCallOut), required=True)
    next_before = String(allow_none=True)


class MeOut(Schema):
    username = String()
    admin = Boolean()
    quota = Nested(QuotaOut)
    models = List(String(), allow_none=True)


__all__ = [n for n in dir() if n.endswith(("In", "Out", "Query", "Patch"))]
