"""Turning generated token ids into text chunks that are safe to stream.

`IncrementalDetokenizer` emits text only once it is complete: never half a UTF-8 character,
never a word without the space before it. `StopSequences` holds back text that might be the
start of a stop sequence, so a stop sequence is never partly emitted, even when it spans
several tokens. Both are pure and thread-confined (one per generated sequence).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Decode a growing list of ids into chunks whose concatenation is the full decode.

    Each step decodes a short window twice, (a) up to the last emitted token and (b) to the
    newest one, and emits the difference once it does not end in a replacement character.
    The window starts with a few prompt tokens, so decoders that drop a leading space at the
    start of a text (SentencePiece) still see the context they need.
    """

    def __init__(self, decoder: Decoder, context: Sequence[int] = ()) -> None:
        self._decoder = decoder
        self._ids: list[int] = list(context[-4:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]


def parse_stop_sequences(value: str | None) -> list[str]:
    """`stop_sequences` is comma-separated; spaces and newlines inside one are kept."""
    if not value:
        return []
    return [s for s in value.split(",") if s]


class StopSequences:
    """Cut a text stream at the first stop sequence, which is never emitted, not even in part."""

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = sorted({s for s in stops if s}, key=len, reverse=True)
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is safe to emit now. Sets `stopped` on a stop sequence."""
        if self.stopped:
            return ""
        self._pending += text
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out = self._pending[: min(hits)]
            self._pending = ""
            self.stopped = True
            return out
        hold = self._held_back()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def _held_back(self) -> int:
        """Length of the longest end of the pending text that begins some stop sequence."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
