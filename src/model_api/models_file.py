"""The models a process serves: one YAML file (``MODELS_FILE``), or without it
the one model of today's ``MODEL_*`` settings.

    default: smol
    models:
      smol:                       # the id clients send as "model"
        backend: batching         # batching | llama | openai
        n_ctx: 2048
        aliases: [SmolLM2-135M-Instruct]
        defaults: {temperature: 0.2, max_tokens: 64}
        max_tokens_cap: 256
      gpu:
        backend: openai
        base_url: http://gpu-box:8000/v1
        api_key_env: GPU_BOX_KEY  # the NAME of an env var; the secret never sits in the file
        upstream_model: Qwen2.5-7B-Instruct
        fallbacks: [smol]

The file is validated whole when the process starts; every error names the
file, the line and the field (``models.yaml:7: models.gpu.base_url: ...``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine.registry import UnknownModel
from .settings import ModelSettings

class ModelsFileError(ValueError):
    """The models file cannot be served as written; the message names line and field."""


@dataclass(frozen=True)
class ModelEntry:
    """One served model: its engine settings and what the API applies around it."""

    id: str
    settings: ModelSettings
    aliases: tuple[str, ...] = ()
    #: per-model sampling defaults (None: the process-wide DEFAULT_* setting)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    #: per-model cap on max_tokens (None: MAX_TOKENS_CAP)
    max_tokens_cap: int | None = None
    #: ids tried in order when this model's upstream fails before its first token
    fallbacks: tuple[str, ...] = ()
    owned_by: str = "model-api"

    @property
    def backend(self) -> str:
        return self.settings.backend

    @property
    def context_size(self) -> int:
        return self.settings.n_ctx


class ModelCatalog:
    """Model ids (and aliases) → :class:`ModelEntry`, plus the default model.

    ``lenient``: the implicit one-model catalog (no MODELS_FILE) answers every
    name with its one model, as the service did before it served several.
    """

    def __init__(self, entries: Mapping[str, ModelEntry], default: str, *, lenient: bool = False,
                 source: str | None = None):
        if default not in entries:
            raise ModelsFileError(f"the default model {default!r} is not among {sorted(entries)}")
        self._entries = dict(entries)
        self._names = {alias: e.id for e in entries.values() for alias in e.aliases}
        self._names.update({i: i for i in entries})
        self.default = default
        self.lenient = lenient
        self.source = source

    def resolve(self, name: str | None) -> ModelEntry:
        """The entry a client's ``model`` names (None or "": the default). Raises UnknownModel."""
        if not name:
            return self._entries[self.default]
        model_id = self._names.get(name)
        if model_id is None:
            if self.lenient:
                return self._entries[self.default]
            raise UnknownModel(name)
        return self._entries[model_id]

    @property
    def names(self) -> dict[str, str]:
        """Every id and alias → its id (exact names only, lenient or not)."""
        return dict(self._names)

    def __getitem__(self, model_id: str) -> ModelEntry:
        return self._entries[model_id]

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def settings(self) -> dict[str, ModelSettings]:
        """id → engine settings (what the EngineRegistry serves)."""
        return {e.id: e.settings for e in self._entries.values()}


def single_model(ms: ModelSettings) -> ModelCatalog:
    """No MODELS_FILE: the one model of the MODEL_* settings, under every name."""
    model_id = ms.name or "default"
    return ModelCatalog({model_id: ModelEntry(model_id, ms, owned_by=_owner(ms))}, model_id, lenient=True)


# --- the file ---------------------------------------------------------------------


class _Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)


def _only(kind: Literal["local", "openai"]) -> Any:
    """An entry field only ``kind`` backends take (unset by default): each field says
    it, so the check that refuses it for the other kind (_ONLY_FOR) cannot miss one."""
    return Field(None, json_schema_extra={"only": kind})


class _Entry(BaseModel):
    """What one entry of ``models:`` may say (anything else is an error: typos are caught)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["batching", "llama", "openai"] = "batching"
    # either backend
    name: str | None = None
    n_ctx: int | None = None
    # local models only (refused for a remote one: _entry)
    path: str | None = _only("local")
    n_threads: int | None = _only("local")
    n_batch: int | None = _only("local")
    n_parallel: int | None = _only("local")
    prefill_chunk: int | None = _only("local")
    max_queue: int | None = _only("local")
    flash_attn: bool | None = _only("local")
    deterministic: bool | None = _only("local")
    # remote models only (refused for a local one)
    base_url: str | None = _only("openai")
    api_key_env: str | None = _only("openai")
    upstream_model: str | None = _only("openai")
    timeout_seconds: float | None = _only("openai")
    connect_timeout_seconds: float | None = _only("openai")
    # around the engine
    aliases: list[str] = []
    defaults: _Defaults = _Defaults()
    max_tokens_cap: int | None = Field(None, ge=1)
    fallbacks: list[str] = []
    owned_by: str | None = None


#: "local" / "openai": the entry fields only that kind of backend takes
_ONLY_FOR = {kind: tuple(name for name, f in _Entry.model_fields.items()
                         if (f.json_schema_extra or {}).get("only") == kind) for kind in ("local", "openai")}
#: the fields of a model entry that are ModelSettings fields under the same name
_SETTINGS_FIELDS = tuple(name for name in _Entry.model_fields if name in ModelSettings.model_fields)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str | None = None
    models: dict[str, _Entry] = Field(min_length=1)


class _Lines:
    """Where each path of the YAML document starts (1-based line numbers)."""

    def __init__(self, source: str):
        self.source = source
        self.at: dict[tuple[Any, ...], int] = {}

    def line(self, path: tuple[Any, ...]) -> int:
        while path and path not in self.at:
            path = path[:-1]
        return self.at.get(path, 1)

    def error(self, path: tuple[Any, ...], message: str) -> ModelsFileError:
        where = ".".join(str(p) for p in path)
        return ModelsFileError(f"{self.source}:{self.line(path)}: {where + ': ' if where else ''}{message}")


def _plain(node: Any, path: tuple[Any, ...], lines: _Lines) -> Any:
    """A composed YAML node as plain data, noting each path's line; duplicate keys are errors."""
    import yaml

    lines.at.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, lines)
            if key in out:
                raise ModelsFileError(f"{lines.source}:{key_node.start_mark.line + 1}: "
                                      f"{'.'.join(map(str, (*path, key)))}: given twice")
            lines.at[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _plain(value_node, (*path, key), lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(item, (*path, i), lines) for i, item in enumerate(node.value)]
    return _scalar(node, lines)


def _scalar(node: Any, lines: _Lines) -> Any:
    import yaml

    if not isinstance(node, yaml.ScalarNode):
        raise ModelsFileError(f"{lines.source}:{node.start_mark.line + 1}: a key must be a plain value")
    return yaml.SafeLoader("").construct_object(node, deep=True)


def load_models_file(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> ModelCatalog:
    """Read and validate a models file. Raises ModelsFileError naming line and field."""
    import yaml

    env = os.environ if env is None else env
    file = Path(path)
    source = str(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ModelsFileError(f"MODELS_FILE={source}: cannot read it ({exc.strerror or exc})") from None
    lines = _Lines(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ModelsFileError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if root is None:
        raise ModelsFileError(f"{source}:1: the file is empty; it needs a `models:` mapping")
    data = _plain(root, (), lines)
    if not isinstance(data, dict):
        raise lines.error((), "the file must be a mapping with `models:` (and optionally `default:`)")
    try:
        parsed = _File.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, (), lines) from None

    entries: dict[str, ModelEntry] = {}
    for model_id, entry in parsed.models.items():
        entries[str(model_id)] = _model_entry(str(model_id), entry, file.parent, env, lines)
    _check_names(entries, lines)
    default = parsed.default or next(iter(entries))
    if default not in entries:
        raise lines.error(("default",), f"{default!r} is not one of the models ({', '.join(entries)})")
    return ModelCatalog(entries, default, source=source)


def _first_error(exc: ValidationError, prefix: tuple[Any, ...], lines: _Lines) -> ModelsFileError:
    # a misspelt field explains a "required" one: say it first
    err = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    loc = (*prefix, *err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field (see models.example.yaml for the fields an entry may have)"
    elif err["type"] == "missing":
        msg = "required"
    return lines.error(loc, msg)


def _model_entry(model_id: str, e: _Entry, base_dir: Path, env: Mapping[str, str], lines: _Lines) -> ModelEntry:
    at = ("models", model_id)
    if not model_id.strip() or len(model_id) > 255:
        raise lines.error(at, "a model id must be 1-255 characters")
    given = {k: getattr(e, k) for k in _SETTINGS_FIELDS if getattr(e, k) is not None}
    remote = e.backend == "openai"
    for key in _ONLY_FOR["local" if remote else "openai"]:
        if getattr(e, key) is not None:
            raise lines.error((*at, key), f"only for {'local' if remote else 'openai'} backends "
                                          f"(this model's backend is {e.backend})")
    if remote:
        if not e.base_url:
            raise lines.error(at, "base_url: required for backend openai")
        if urlparse(e.base_url).scheme not in ("http", "https"):
            raise lines.error((*at, "base_url"), "must be an http:// or https:// URL")
        if e.api_key_env is not None:
            if e.api_key_env not in env:
                raise lines.error((*at, "api_key_env"), f"the environment variable {e.api_key_env} is not set")
            given["api_key"] = env[e.api_key_env]
        # the name sent upstream; unset: the first one the upstream lists
        given["name"] = e.upstream_model
    else:
        if e.path is not None:
            p = Path(e.path).expanduser()
            p = p if p.is_absolute() else base_dir / p
            if not p.is_file():
                raise lines.error((*at, "path"), f"no such file: {p}")
            given["path"] = str(p)
        # replies (and the call rows) name the model by its id, unless `name` says otherwise
        given["name"] = e.name or model_id
    if remote and e.name is not None:
        raise lines.error((*at, "name"), "use upstream_model for the name sent upstream")
    # every field given explicitly: a file entry never picks up MODEL_* variables
    full = {k: f.default for k, f in ModelSettings.model_fields.items()}
    full.update(given)
    try:
        ms = ModelSettings(**full)
    except ValidationError as exc:
        raise _first_error(exc, at, lines) from None
    d = e.defaults
    cap = e.max_tokens_cap
    if cap is not None and d.max_tokens is not None and d.max_tokens > cap:
        raise lines.error((*at, "defaults", "max_tokens"), f"must be <= max_tokens_cap ({cap})")
    return ModelEntry(
        id=model_id, settings=ms, aliases=tuple(e.aliases), max_tokens=d.max_tokens, temperature=d.temperature,
        top_p=d.top_p, max_tokens_cap=cap, fallbacks=tuple(e.fallbacks), owned_by=e.owned_by or _owner(ms),
    )


def _check_names(entries: dict[str, ModelEntry], lines: _Lines) -> None:
    seen: dict[str, str] = {i: i for i in entries}
    for e in entries.values():
        for i, alias in enumerate(e.aliases):
            where = ("models", e.id, "aliases", i)
            if alias in seen:
                raise lines.error(where, f"{alias!r} already names the model {seen[alias]!r}")
            seen[alias] = e.id
        for i, other in enumerate(e.fallbacks):
            where = ("models", e.id, "fallbacks", i)
            if other == e.id:
                raise lines.error(where, "a model cannot be its own fallback")
            if other not in entries:
                raise lines.error(where, f"{other!r} is not one of the models ({', '.join(entries)})")


def _owner(ms: ModelSettings) -> str:
    """``owned_by`` in /v1/models: this service for local models, the upstream's host for remote ones."""
    if ms.backend == "openai" and ms.base_url:
        return urlparse(ms.base_url).hostname or "upstream"
    return "model-api"


__all__ = ["ModelCatalog", "ModelEntry", "ModelsFileError", "load_models_file", "single_model"]
