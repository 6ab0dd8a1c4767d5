"""A call whose text is consumed as it is generated (the SSE routes)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

from ..engine.base import Completion, EngineError, Generation
from ..models import CallStatus
from .ledger import Ledger
from .limits import NOTHING_HELD, Admission
from .quota import QuotaState

log = logging.getLogger(__name__)


class StreamingCall:
    """Made by :meth:`ModelCalls.stream`, which has already admitted it and
    produced the first delta, so every error that can be reported with a status
    code has been. Iterate for the deltas; when they end the row is completed.
    :meth:`cancel` (the client went away) stops the model and records what was
    produced: status ``cancelled``, ``finish_reason`` ``cancelled``, and the
    quota unit is **kept** (the model worked for the client; only failures on
    our side are refunded). A failure after the first delta is recorded and
    refunded, then re-raised for the route to report in-stream.
    """

    def __init__(self, ledger: Ledger, call_id: uuid.UUID, quota_state: QuotaState, gen: Generation, model: str,
                 prompt_tokens: int, admission: Admission = NOTHING_HELD):
        self.ledger = ledger
        #: its rate limits' hold (settled when the stream ends, however it ends)
        self.admission = admission
        self.call_id = call_id
        self.quota = quota_state
        self.model = model
        self._gen = gen
        self._prompt_tokens = prompt_tokens
        self._first: str | None = None
        self._pieces: list[str] = []
        self._done = False
        self.result: Completion | None = None

    def prime(self) -> None:
        """Run the model up to its first delta (or to its end)."""
        try:
            self._first = next(self._gen)
        except StopIteration:
            self._first = None

    def __iter__(self) -> Iterator[str]:
        try:
            # _first is None when the model ended before producing any text
            if self._first is not None:
                self._pieces.append(self._first)
                yield self._first
                for piece in self._gen:
                    self._pieces.append(piece)
                    yield piece
        except EngineError as exc:
            self._done = True
            self.ledger.fail(self.call_id, f"model error: {exc}", partial=self._partial("error"))
            self.admission.settle(0)
            raise
        result = self._gen.result
        assert result is not None
        self.result = result
        self._done = True
        self.ledger.complete(self.call_id, result)
        self.admission.settle(result.prompt_tokens + result.completion_tokens)

    def _partial(self, reason: str) -> Completion:
        text = "".join(self._pieces)
        return Completion(text=text, prompt_tokens=self._prompt_tokens,
                          completion_tokens=len(self._pieces), finish_reason=reason, model=self.model)

    def cancel(self, why: str = "client disconnected") -> None:
        """Stop the model and record the call as cut short (idempotent; no-op once finished)."""
        if self._done:
            return
        self._done = True
        try:
            self._gen.close()
        except Exception:  # the engine is stopping anyway; the row must still be written
            log.exception("closing a generation failed")
        result = self._gen.result
        if result is None or result.finish_reason != "cancelled":
            result = self._partial("cancelled")
        self.result = result
        self.ledger.fail(self.call_id, why, refund=False, status=CallStatus.CANCELLED, partial=result)
        self.admission.settle(result.prompt_tokens + result.completion_tokens)
