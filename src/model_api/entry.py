"""The ``model-api`` command: Flask's CLI around an app built for the CLI.

Apart from :mod:`model_api.cli` (the commands, which ``create_app`` registers)
so that nothing imports the app factory back.
"""

from __future__ import annotations

from flask.cli import FlaskGroup

from . import cli
from .app import create_app


def _cli_app():
    # the CLI never needs the model loaded
    return create_app({"model_load_at_start": False, "recover_jobs_at_start": False})


main = FlaskGroup(create_app=_cli_app, add_default_commands=True, help=cli.__doc__)


if __name__ == "__main__":
    main()
