"""The README and docs/ document what the code does, and their links lead somewhere."""

import re
from pathlib import Path

from model_api.settings import settings_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_configuration_table_matches_settings():
    text = CONFIGURATION.read_text()
    start = text.index("<!-- settings-table:start -->") + len("<!-- settings-table:start -->")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end].strip() == settings_table().strip(), (
        "docs/configuration.md's table is stale: regenerate with "
        "python -c 'from model_api.settings import settings_table; print(settings_table())'"
    )


def test_readme_is_a_short_landing_page():
    text = README.read_text()
    assert "make run" in text and "make test" in text
    assert len(text) < 8000, "the README is the landing page: put details in docs/"
    for page in ("docs/api.md", "docs/operations.md", "docs/configuration.md", "docs/postman.md",
                 "docs/development.md", "docs/architecture.md"):
        assert f"]({page})" in text, page
    # the seed's endpoints
    for path in ("/health_check", "/call_model", "/async_call_model", "/async_call_status"):
        assert f"`{'GET' if 'status' in path or 'health' in path else 'POST'} {path}" in text, path


def _links(path: Path):
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if "placeholder" in line:  # a page announced before it exists (docs/architecture.md)
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if not target.startswith(("http://", "https://", "mailto:")):
                yield n, target


def _anchors(path: Path) -> set[str]:
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_relative_links_and_anchors_resolve():
    broken = []
    for doc in DOCS:
        for n, target in _links(doc):
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}:{n}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}:{n}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_documented_cli_command_exists():
    """`bin/model-api X Y` in the docs names a real command (checked against the CLI itself)."""
    from click.testing import CliRunner

    from model_api.entry import main

    seen = set()
    for doc in DOCS:
        for m in re.finditer(r"(?:bin/)?model-api ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)?)", doc.read_text()):
            seen.add(tuple(m.group(1).split()))
    assert ("users", "delete") in seen and ("keys", "create") in seen
    runner = CliRunner()
    for words in sorted(seen):
        # the second word may be an argument (`users create alice`): fall back to the group
        for args in (list(words), list(words[:1])):
            r = runner.invoke(main, [*args, "--help"])
            if r.exit_code == 0:
                break
        assert r.exit_code == 0, f"model-api {' '.join(words)}: {r.output}"
