"""The ``model-api`` console script: Flask's CLI group for this app.

The commands themselves live in :mod:`model_api.cli` (registered on the app by
``register_commands``); this module only builds the group, so importing the
commands never imports the app factory.
"""

from __future__ import annotations

import platform

import click
from flask.cli import FlaskGroup

from .version import package_version

# \b keeps click from rewrapping the paragraph that follows it
HELP = """Run and manage the ML Model API.

\b
  model-api db upgrade                     apply migrations (create the tables)
  model-api bootstrap                      first user, when there is none
  model-api users create NAME --password-stdin [--quota N]
  model-api users list | set-quota NAME N | set-password NAME
  model-api users delete NAME [--yes]      deactivate (asks unless --yes)
  model-api keys create NAME | list | revoke ID
  model-api worker [-c N]                  Celery worker (needs CELERY_BROKER_URL)

\b
It reads the same environment variables as the server (DATABASE_URL, ...).
Without DATABASE_URL it uses the SQLite file in INSTANCE_DIR (default: the
project's instance/ directory, from whatever directory you run it).
`model-api COMMAND --help` describes each command.
"""


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"model-api {package_version()} (Python {platform.python_version()})")
    ctx.exit()


def _cli_app():
    from .app import create_app

    # the CLI never needs the model loaded, nor the app's background loops
    return create_app({"model_load_at_start": False, "recover_jobs_at_start": False, "deliver_webhooks": False})


main = FlaskGroup(
    name="model-api",
    create_app=_cli_app,
    add_default_commands=True,
    add_version_option=False,
    help=HELP,
    params=[click.Option(["--version"], is_flag=True, expose_value=False, is_eager=True,
                         callback=_print_version, help="Show model-api's version and exit.")],
    context_settings={"max_content_width": 100},
)


if __name__ == "__main__":
    main()
