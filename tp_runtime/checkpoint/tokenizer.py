"""The model folder's tokenizer.json (optional when token ids are given), and streaming decode."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from tp_runtime.errors import CheckpointError, ConfigError, GenerationError

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read by the tokenizers library ({e})") from None


def encode_prompt(tokenizer: Tokenizer | None, text: str) -> list[int]:
    """Token ids of a prompt (the tokenizer's own special tokens, e.g. BOS, included)."""
    if tokenizer is None:
        raise ConfigError("this model folder has no tokenizer.json: give token ids (--prompt-ids) instead of text")
    ids = tokenizer.encode(text).ids
    if not ids:
        raise GenerationError(f"prompt {text!r} encodes to no tokens")
    return ids


class StreamDecoder:
    """Turns a growing list of ids into text increments, holding back incomplete UTF-8 sequences.

    Each push decodes only the ids since the last emitted piece, from one piece back (vLLM's
    prefix and read offsets): a tokenizer that drops a leading space at the start of a decode
    drops it from both texts compared, and a long answer costs a short decode per token."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids before this are out of the window
        self.read = 0  # ids before this have been emitted as text

    def _text(self, stop: int) -> str:
        return self.tokenizer.decode(self.ids[self.prefix : stop], skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before, after = self._text(self.read), self._text(len(self.ids))
        if after.endswith("\ufffd") or len(after) <= len(before):  # a character still being spelled out
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def finish(self) -> str:
        """Whatever was held back (bytes that never completed a character)."""
        before, after = self._text(self.read), self._text(len(self.ids))
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""
