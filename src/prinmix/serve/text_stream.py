"""Incremental detokenization with stop strings, so that streamed pieces add up to the final text."""

from __future__ import annotations


class TextStream:
    """Turns a growing list of generated token ids into text pieces.

    `update(ids, final)` returns (new text, stopped): the text up to the first stop string (excluded;
    stopped=True), else all new text but a tail that could still become a stop string; `final` releases
    that tail. Returned text is never taken back, so the pieces concatenate to the non-streaming answer.
    Each call decodes only the last few tokens: the new ones after a window of already decoded ones (their
    context, e.g. for leading spaces), and waits while the new text ends in an incomplete character.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""          # decoded so far
        self.sent = 0           # characters of self.text handed out
        self._prefix = 0        # ids[_prefix:_read] is the context window, ids[_read:] not decoded yet
        self._read = 0

    def update(self, token_ids: list[int], final: bool = False) -> tuple[str, bool]:
        self._decode(token_ids, final)
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            return self._take(min(hits)), True
        return self._take(len(self.text) if final else len(self.text) - self._held_back()), False

    def _decode(self, ids: list[int], final: bool) -> None:
        if len(ids) <= self._read:
            return
        decode = lambda part: self.tokenizer.decode(part, skip_special_tokens=True)
        context = decode(ids[self._prefix:self._read])
        text = decode(ids[self._prefix:])
        if len(text) > len(context) and (final or not text.endswith("\ufffd")):
            self.text += text[len(context):]
            self._prefix, self._read = self._read, len(ids)

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for k in range(max((len(s) - 1 for s in self.stop), default=0), 0, -1):
            tail = self.text[-k:]
            if len(tail) == k and any(s.startswith(tail) for s in self.stop):
                return k
        return 0
