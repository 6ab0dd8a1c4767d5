"""The one object a model call is described by, from the route to the ledger."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.base import GenerationRequest
from ..models import CallKind
from .limits import AccountLimits
from .quota import QuotaState


@dataclass(frozen=True)
class CallIntent:
    """Who asks for what: built once per request (``api/context.py``) or per job,
    then passed whole instead of a long parameter list."""

    user_id: int
    request: GenerationRequest
    kind: CallKind
    request_id: str | None = None
    #: the API key the call was made with (None: Basic auth)
    api_key_id: int | None = None
    #: the user's quota as read with the credentials: lets a call refuse a user
    #: visibly out of quota before the model starts (the database's atomic
    #: reservation still decides)
    quota: QuotaState | None = None
    #: the registry's model id; None: the default model
    model: str | None = None
    #: async jobs: where to POST the job's status when it ends (already checked)
    callback_url: str | None = None
    #: model ids tried in order when ``model`` fails before its first token (MODELS_FILE ``fallbacks``)
    fallbacks: tuple[str, ...] = ()
    #: the caller's rate, token and concurrency limits as read with the credentials
    #: (None: read from the database at admission)
    limits: AccountLimits | None = None
