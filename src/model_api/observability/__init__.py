"""Logs and metrics shared by the web app, the CLI and job workers (no Flask here)."""
