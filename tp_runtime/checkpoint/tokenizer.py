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
    """Turns a growing list of ids into text increments, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is still being spelled out
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new

    def finish(self) -> str:
        """Whatever was held back (bytes that never completed a character)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        rest, self.emitted = text[self.emitted :], len(text)
        return rest
