"""Stop-string handling shared by the engines, so both stop at the same place."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Watches streamed text for stop strings.

    Text that could be the start of a stop string is held back until it is
    clear whether it is one; the stop string itself is never emitted.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add generated text; return what can safely be emitted now.
        After a stop string is seen, :attr:`stopped` is true and the text
        before it has been returned."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        cut = -1
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Generation ended without a stop string: release what was held back."""
        out, self._held = self._held, ""
        return out
