"""This package's version, for ``model-api --version`` and ``GET /``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("model-api")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"
