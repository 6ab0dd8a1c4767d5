"""MODELS_FILE: a catalog of models by id, validated at start with errors that
name the line and the field (no model is loaded by any of these tests)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from model_api.engine.registry import UnknownModel
from model_api.models_file import ModelsFileError, load_models_file, single_model
from model_api.settings import ModelSettings

ROOT = Path(__file__).resolve().parents[2]

TWO_MODELS = """\
default: long
models:
  short:
    backend: llama
    n_ctx: 512
    defaults: {temperature: 0, max_tokens: 16}
    max_tokens_cap: 64
  long:
    n_ctx: 2048
    n_parallel: 2
    prefill_chunk: 64
    aliases: [SmolLM2-135M-Instruct, smol]
  gpu:
    backend: openai
    base_url: http://gpu-box:8000/v1
    api_key_env: GPU_KEY
    upstream_model: Qwen2.5-7B-Instruct
    fallbacks: [long]
"""


def catalog_of(tmp_path: Path, text: str, **env: str):
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(text))
    return load_models_file(path, env={"GPU_KEY": "sk-secret", **env})


def error_of(tmp_path: Path, text: str, **env: str) -> str:
    with pytest.raises(ModelsFileError) as exc:
        catalog_of(tmp_path, text, **env)
    return str(exc.value)


def test_a_file_lists_models_by_id_with_their_settings(tmp_path):
    catalog = catalog_of(tmp_path, TWO_MODELS)
    assert [e.id for e in catalog] == ["short", "long", "gpu"] and catalog.default == "long"
    short, long, gpu = catalog["short"], catalog["long"], catalog["gpu"]
    assert (short.backend, short.context_size, short.settings.name) == ("llama", 512, "short")
    assert (short.temperature, short.max_tokens, short.max_tokens_cap) == (0, 16, 64)
    assert (long.backend, long.settings.n_parallel, long.settings.path) == ("batching", 2, None)
    assert long.settings.prefill_chunk == 64 and short.settings.prefill_chunk is None
    assert (gpu.settings.base_url, gpu.settings.api_key, gpu.settings.name) == (
        "http://gpu-box:8000/v1", "sk-secret", "Qwen2.5-7B-Instruct")
    assert gpu.fallbacks == ("long",) and gpu.owned_by == "gpu-box" and long.owned_by == "model-api"


@pytest.mark.parametrize("name, model_id", [
    (None, "long"), ("", "long"), ("short", "short"), ("smol", "long"), ("SmolLM2-135M-Instruct", "long"),
])
def test_names_resolve_to_ids_and_no_name_is_the_default(tmp_path, name, model_id):
    assert catalog_of(tmp_path, TWO_MODELS).resolve(name).id == model_id


def test_an_unknown_name_is_unknown_with_a_file_and_the_one_model_without(tmp_path):
    with pytest.raises(UnknownModel):
        catalog_of(tmp_path, TWO_MODELS).resolve("gpt-4o")
    implicit = single_model(ModelSettings())
    assert implicit.resolve("gpt-4o").id == implicit.default == "default"


def test_file_entries_ignore_model_variables_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_N_CTX", "4096")
    monkeypatch.setenv("MODEL_BACKEND", "llama")
    long = catalog_of(tmp_path, TWO_MODELS)["long"]
    assert (long.backend, long.context_size) == ("batching", 2048)


def test_a_relative_path_is_read_from_the_files_folder(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    entry = catalog_of(tmp_path, "models:\n  m:\n    path: weights.gguf\n")["m"]
    assert entry.settings.path == str(tmp_path / "weights.gguf")


def test_the_example_file_in_the_repository_is_valid():
    catalog = load_models_file(ROOT / "models.example.yaml", env={"GPU_BOX_API_KEY": "sk-x"})
    assert catalog.default == "smol" and {e.backend for e in catalog} == {"batching", "llama", "openai"}
    assert catalog["gpu"].fallbacks == ("smol",)


@pytest.mark.parametrize("text, expected", [
    ("models:\n  m:\n    n_ctx: 64\n", "models.yaml:3: models.m.n_ctx: Input should be greater than or equal to 128"),
    ("models:\n  m:\n    backend: vllm\n", "models.yaml:3: models.m.backend: Input should be"),
    ("models:\n  m:\n    nctx: 512\n", "models.yaml:3: models.m.nctx: unknown field"),
    ("models:\n  m:\n    backend: openai\n", "models.yaml:2: models.m: base_url: required for backend openai"),
    ("models:\n  m:\n    backend: openai\n    base_url: gpu:8000\n",
     "models.yaml:4: models.m.base_url: must be an http:// or https:// URL"),
    ("models:\n  m:\n    backend: openai\n    base_url: http://x/v1\n    api_key_env: NOPE\n",
     "models.yaml:5: models.m.api_key_env: the environment variable NOPE is not set"),
    ("models:\n  m:\n    backend: openai\n    base_url: http://x/v1\n    n_parallel: 2\n",
     "models.yaml:5: models.m.n_parallel: only for local backends"),
    ("models:\n  m:\n    backend: openai\n    base_url: http://x/v1\n    prefill_chunk: 64\n",
     "models.yaml:5: models.m.prefill_chunk: only for local backends"),
    ("models:\n  m:\n    upstream_model: x\n", "models.yaml:3: models.m.upstream_model: only for openai backends"),
    ("models:\n  m:\n    path: missing.gguf\n", "models.yaml:3: models.m.path: no such file"),
    ("default: x\nmodels:\n  m: {}\n", "models.yaml:1: default: 'x' is not one of the models (m)"),
    ("models:\n  m: {}\n  n:\n    aliases: [m]\n", "models.yaml:4: models.n.aliases.0: 'm' already names the model 'm'"),
    ("models:\n  m:\n    fallbacks: [m]\n", "models.yaml:3: models.m.fallbacks.0: a model cannot be its own fallback"),
    ("models:\n  m:\n    fallbacks: [gpu]\n", "models.yaml:3: models.m.fallbacks.0: 'gpu' is not one of the models"),
    ("models:\n  m:\n    defaults: {max_tokens: 100}\n    max_tokens_cap: 50\n",
     "models.yaml:3: models.m.defaults.max_tokens: must be <= max_tokens_cap (50)"),
    ("models:\n  m:\n    defaults: {temperature: 3}\n", "models.yaml:3: models.m.defaults.temperature: Input should be"),
    ("models:\n  m: {}\n  m: {}\n", "models.yaml:3: models.m: given twice"),
    ("models: {}\n", "models.yaml:1: models: Dictionary should have at least 1 item"),
    ("modles:\n  m: {}\n", "models.yaml:1: modles: unknown field"),
    ("", "models.yaml:1: the file is empty"),
    ("models:\n  m: [\n", "models.yaml:3: not valid YAML"),
])
def test_a_bad_file_is_refused_naming_the_line_and_the_field(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_the_secret_of_api_key_env_never_appears_in_an_error(tmp_path):
    msg = error_of(tmp_path, "models:\n  m:\n    backend: openai\n    base_url: http://x/v1\n"
                             "    api_key_env: GPU_KEY\n    timeout_seconds: -1\n")
    assert "timeout_seconds" in msg and "sk-secret" not in msg


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelsFileError, match="MODELS_FILE=.*nope.yaml: cannot read it"):
        load_models_file(tmp_path / "nope.yaml")


# -- flash attention by default; MODEL_DETERMINISTIC turns it off ------------------

@pytest.mark.parametrize("env, flash", [
    ({}, True),
    ({"MODEL_DETERMINISTIC": "1"}, False),
    ({"MODEL_FLASH_ATTN": "0"}, False),
    # the guarantee wins over a flag that would break it
    ({"MODEL_DETERMINISTIC": "true", "MODEL_FLASH_ATTN": "1"}, False),
])
def test_flash_attention_is_on_unless_determinism_is_asked_for(monkeypatch, env, flash):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert ModelSettings().use_flash_attn is flash


def test_a_model_in_the_file_can_ask_for_determinism(tmp_path):
    catalog = catalog_of(tmp_path, "models:\n  exact:\n    deterministic: true\n  fast: {}\n")
    assert catalog["exact"].settings.use_flash_attn is False
    assert catalog["fast"].settings.use_flash_attn is True
    assert "models.exact.deterministic: Input should be a valid boolean" in error_of(
        tmp_path, "models:\n  exact:\n    deterministic: sometimes\n")
    assert "models.gpu.deterministic: only for local backends" in error_of(
        tmp_path, "models:\n  gpu:\n    backend: openai\n    base_url: http://x/v1\n    deterministic: true\n")
