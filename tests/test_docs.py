"""The README documents what the code does."""

from pathlib import Path

from model_api.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_configuration_table_matches_settings():
    text = README.read_text()
    start = text.index("<!-- settings-table:start -->") + len("<!-- settings-table:start -->")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end].strip() == settings_table().strip(), (
        "README configuration table is stale: regenerate with "
        "python -c 'from model_api.settings import settings_table; print(settings_table())'"
    )


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text
