"""Schema migrations (Alembic), callable from the CLI, tests and start-up scripts."""

from __future__ import annotations

import logging
from pathlib import Path

# alembic announces each of its autogenerate plugins at INFO as it is imported:
# noise in front of every CLI command's output (and of its one-line errors)
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    # a read: alembic's "Context impl ..." INFO lines would only be noise here
    log = logging.getLogger("alembic.runtime.migration")
    level = log.level
    log.setLevel(logging.WARNING)
    engine = create_engine(url, hide_parameters=True)
    try:
        with engine.connect() as conn:
            rev = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
        log.setLevel(level)
    return rev
