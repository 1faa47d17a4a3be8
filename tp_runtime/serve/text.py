"""A request's generated text as it streams: incremental detokenization and stop strings.

Tokens become text through StreamDecoder (a multi-byte character split across tokens is held
back until it is whole). With stop strings, the last (longest stop - 1) characters are held
back too, since they may be the start of a stop string the next token completes; a stop string
ends the text before it (OpenAI's habit: the stop string itself is not returned). The deltas
concatenated are always the final text.
"""

from __future__ import annotations

from tp_runtime.checkpoint.tokenizer import StreamDecoder


class TextStream:
    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of text handed out
        self.stopped = False  # a stop string was found: the text is final

    def push(self, token_id: int) -> str:
        """The text a new token makes safe to send."""
        return "" if self.stopped else self._advance(self.decoder.push(token_id), final=False)

    def finish(self) -> str:
        """The rest, at the end of the sequence."""
        return "" if self.stopped else self._advance(self.decoder.finish(), final=True)

    def _advance(self, piece: str, final: bool) -> str:
        self.text += piece
        if self.stops and piece:
            start = max(0, self.sent - self.hold)
            found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if found:
                self.text = self.text[: min(found)]
                self.stopped = final = True
        limit = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent : limit], limit
        return delta
