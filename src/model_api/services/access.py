"""Per-model access: a user, and an API key within its user, may be limited to a
list of model ids (``users.allowed_models``, ``api_keys.allowed_models``; NULL
means no limit). No Flask: the CLI and the web share it."""

from __future__ import annotations

from collections.abc import Iterable

from ..models import User
from .auth import UserError


class ModelNotAllowed(Exception):
    """The caller's user or key may not use this model (403; nothing charged)."""

    def __init__(self, model_id: str):
        super().__init__(f"you may not use the model {model_id!r}")
        self.model_id = model_id


def effective(user_models: Iterable[str] | None, key_models: Iterable[str] | None = None) -> frozenset[str] | None:
    """The ids a request may use: the user's list narrowed by the key's (None: any model)."""
    lists = [frozenset(m) for m in (user_models, key_models) if m is not None]
    if not lists:
        return None
    return frozenset.intersection(*lists)


def check(allowed: frozenset[str] | None, model_id: str) -> None:
    """Raise ModelNotAllowed unless ``model_id`` is within ``allowed``."""
    if allowed is not None and model_id not in allowed:
        raise ModelNotAllowed(model_id)


def set_user_models(user: User, model_ids: list[str] | None) -> None:
    """Limit ``user`` to these ids (None: every model)."""
    user.allowed_models = None if model_ids is None else sorted(set(model_ids))


def canonical_ids(names: Iterable[str], served: dict[str, str]) -> list[str]:
    """Ids for names an operator typed (ids or aliases; ``served`` maps each to its
    id); an unknown one is a UserError listing what is served."""
    out = []
    for name in names:
        model_id = served.get(name)
        if model_id is None:
            raise UserError(f"no model {name!r} is served (models: {', '.join(sorted(set(served.values())))})")
        out.append(model_id)
    return out


__all__ = ["ModelNotAllowed", "canonical_ids", "check", "effective", "set_user_models"]
