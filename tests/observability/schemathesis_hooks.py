"""Schemathesis hooks for test_live_server.py's fuzzing run (SCHEMATHESIS_HOOKS).

An ``Idempotency-Key`` promises "this exact request again": a client sends a
fresh key per logical request. The fuzzer draws keys from a small space ("0"
again and again) for different bodies, which the API rightly refuses (422
``idempotency_key_reused``, a contract no schema can state). So each request
keeps the generated key's shape and gets a unique suffix, as a real client's
key would be. Replays, 409s and 422s are tested in tests/api/test_idempotency*.py.
"""

import uuid
from datetime import UTC, datetime, timedelta

import schemathesis


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    key = (case.headers or {}).get("Idempotency-Key")
    if isinstance(key, str):
        case.headers["Idempotency-Key"] = f"{key[:200]}-{uuid.uuid4().hex}"

    # A new key's expires_at must lie in the future (400 otherwise: a contract no schema
    # can state, tested in tests/api/test_admin.py): keep the field, move it ahead.
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("expires_at"), str):
        body["expires_at"] = (datetime.now(UTC) + timedelta(days=30)).isoformat()
