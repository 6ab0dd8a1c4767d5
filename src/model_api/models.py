"""Database tables. Every model call — sync, async or streamed — is one ``calls`` row."""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Date, Float, ForeignKey, Index, String, Text, UniqueConstraint, Uuid, false, true
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .db import Base, utcnow


class CallStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (CallStatus.COMPLETED, CallStatus.FAILED, CallStatus.CANCELLED)

    @property
    def seed_status(self) -> str:
        """The seed's three-valued ``job_status``; queued and running are both 'processing'."""
        if self in (CallStatus.QUEUED, CallStatus.RUNNING):
            return "processing"
        return self.value


class CallKind(enum.StrEnum):
    SYNC = "sync"
    ASYNC = "async"
    STREAM = "stream"
    CHAT = "chat"
    COMPLETION = "completion"


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(150), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    # NULL means "the global DEFAULT_QUOTA"
    quota: Mapped[int | None] = mapped_column(default=None)
    used: Mapped[int] = mapped_column(default=0, server_default="0")
    window_started_at: Mapped[datetime | None] = mapped_column(default=None)
    # model ids this user may call; NULL means every model
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    is_active: Mapped[bool] = mapped_column(default=True, server_default=true())
    # admins reach /admin and the console's operator pages (bootstrap's first user is one)
    is_admin: Mapped[bool] = mapped_column(default=False, server_default=false())
    # per-user limits (issue 14); NULL means "the settings' default"
    rpm_limit: Mapped[int | None] = mapped_column(default=None)
    tpm_limit: Mapped[int | None] = mapped_column(default=None)
    concurrency_limit: Mapped[int | None] = mapped_column(default=None)
    token_budget: Mapped[int | None] = mapped_column(default=None)
    # tokens charged against token_budget (prompt + completion, settled at the end of each call)
    tokens_used: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    calls: Mapped[list[Call]] = relationship(back_populates="user")
    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="user", passive_deletes=True)


class Call(Base):
    __tablename__ = "calls"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[str] = mapped_column(Text)
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    response: Mapped[str | None] = mapped_column(Text, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    finish_reason: Mapped[str | None] = mapped_column(String(16), default=None)
    prompt_tokens: Mapped[int | None] = mapped_column(default=None)
    completion_tokens: Mapped[int | None] = mapped_column(default=None)
    model: Mapped[str | None] = mapped_column(String(255), default=None)
    # the id (MODELS_FILE) the call was routed to; an async job runs on it. `model`
    # above is the name the engine reported
    model_id: Mapped[str | None] = mapped_column(String(255), default=None)
    request_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # the API key the call was made with; NULL for Basic auth (and for keys since deleted)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), default=None)
    # "host:pid:nonce" of the process running the call, to tell orphans from live work
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    # True while the call holds a quota unit; flipped once on refund so a unit
    # can never be given back twice.
    charged: Mapped[bool] = mapped_column(default=True, server_default=true())
    # tokens (prompt + max_tokens) added to its user's and key's tokens_used at
    # admission when a token budget applied to either; the final write settles
    # them to the real count (NULL: no budget applied, nothing to settle)
    reserved_tokens: Mapped[int | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    # set by /async_call_cancel on a running job; whichever process runs it polls this
    cancel_requested: Mapped[bool] = mapped_column(default=False, server_default=false())
    # last time the job's id was handed to a queue (the reconciler's clock for lost messages)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    user: Mapped[User] = relationship(back_populates="calls")

    __table_args__ = (
        Index("ix_calls_user_id_created_at", "user_id", "created_at"),
        Index("ix_calls_status_created_at", "status", "created_at"),
        # usage reports group a time range by key, by model or by day
        Index("ix_calls_api_key_id_created_at", "api_key_id", "created_at"),
        Index("ix_calls_model_id_created_at", "model_id", "created_at"),
        Index("ix_calls_created_at", "created_at"),
    )


class ApiKey(Base):
    """A per-user API key for ``Authorization: Bearer``.

    Only a SHA-256 of the key is stored: keys are 256-bit random strings, so a
    fast hash is enough (nothing to brute-force) and keeps every request cheap.
    ``prefix`` (the first characters, not secret on their own) lets users tell
    their keys apart in listings.
    """

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    # keys die with their user row (users are normally deactivated, not deleted)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(100), default=None)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # model ids this key may call (within its user's); NULL means no narrowing
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    # past it the key is refused like a revoked one; NULL: never expires
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # per-key limits (issue 14), applied within the user's; NULL means no narrowing
    rpm_limit: Mapped[int | None] = mapped_column(default=None)
    tpm_limit: Mapped[int | None] = mapped_column(default=None)
    concurrency_limit: Mapped[int | None] = mapped_column(default=None)
    token_budget: Mapped[int | None] = mapped_column(default=None)
    tokens_used: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # weight in the engine's fair scheduler (NULL: 1)
    priority: Mapped[int | None] = mapped_column(default=None)

    user: Mapped[User] = relationship(back_populates="api_keys")


class IdempotencyKey(Base):
    """One ``Idempotency-Key`` a user sent, and once its request finished, the
    response to replay. The unique (user_id, key) pair is the lock: the first
    request's INSERT wins, every concurrent one finds the row (see
    ``services/idempotency.py``)."""

    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    # SHA-256 of method, path and the canonical JSON body: the same key with another request is refused
    fingerprint: Mapped[str] = mapped_column(String(64))
    # a fresh value per claim, so a holder that lost its claim (expired, taken over) cannot store a reply
    token: Mapped[str] = mapped_column(String(32))
    # "host:pid:nonce" of the process running the first request (a dead holder's claim is taken over)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    # NULL while the first request runs
    response_status: Mapped[int | None] = mapped_column(default=None)
    response_body: Mapped[str | None] = mapped_column(Text, default=None)
    response_headers: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)

    __table_args__ = (UniqueConstraint("user_id", "key"),)


class WebhookSecret(Base):
    """The key a user's webhook deliveries are signed with (``whsec_`` + base64, as Standard Webhooks)."""

    __tablename__ = "webhook_secrets"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookState(enum.StrEnum):
    WAITING = "waiting"  # the job has not ended yet
    PENDING = "pending"  # the job ended: to be delivered (again) at next_attempt_at
    DELIVERED = "delivered"
    FAILED = "failed"  # WEBHOOK_MAX_ATTEMPTS spent, or the URL was refused at delivery


class WebhookDelivery(Base):
    """The outbox: one row per async job with a ``callback_url``, written with the
    job row and armed (``pending``) in the transaction that writes the job's final
    state, so a job's end and its delivery can never be separated by a crash."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)  # the webhook-id
    call_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("calls.id", ondelete="CASCADE"), unique=True)
    url: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=WebhookState.WAITING.value)
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    # a claimed attempt's lease: a process that died mid-attempt leaves it to expire
    locked_until: Mapped[datetime | None] = mapped_column(default=None)
    last_status: Mapped[int | None] = mapped_column(default=None)  # HTTP status; NULL: no answer
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),)


class AdminEvent(Base):
    """The audit log: one row per change made through the admin API, the console or the CLI."""

    __tablename__ = "admin_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    # NULL when the change came from the CLI (no signed-in actor)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), default=None)
    action: Mapped[str] = mapped_column(String(64))  # e.g. "user.create", "key.revoke"
    target: Mapped[str | None] = mapped_column(String(255), default=None)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    request_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class UsageDaily(Base):
    """The usage report's figures of one closed UTC day, per user, per key and per
    model (``dimension``), so a report over months reads a few thousand rows instead
    of every call. Written once per day by ``services/usage.roll_up`` when every
    call of that day has reached a final state (a final call never changes again);
    days not rolled up yet are read from ``calls``."""

    __tablename__ = "usage_daily"

    # dimension first: a report reads one dimension's rows over a range of days
    dimension: Mapped[str] = mapped_column(String(8), primary_key=True)  # user | key | model
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    # the user id, key id or model id as text; "" for calls without one (no key, no model)
    grp: Mapped[str] = mapped_column(String(255), primary_key=True)
    calls: Mapped[int] = mapped_column(BigInteger)
    completed: Mapped[int] = mapped_column(BigInteger)
    failed: Mapped[int] = mapped_column(BigInteger)
    refunded: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    model_seconds: Mapped[float] = mapped_column(Float)


class UsageDay(Base):
    """A UTC day whose calls are in ``usage_daily`` (its primary key is the lock two
    processes rolling up the same day meet on)."""

    __tablename__ = "usage_days"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    calls: Mapped[int] = mapped_column(BigInteger)
    rolled_at: Mapped[datetime] = mapped_column(default=utcnow)
