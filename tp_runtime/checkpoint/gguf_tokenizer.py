"""A GGUF file's tokenizer, built with `tokenizers` from the metadata llama.cpp reads.

`gpt2`-type vocabularies are byte-level BPE: tokens, merges, and the pre-tokenizer the file
names (`tokenizer.ggml.pre`), split the way llama.cpp splits it (its regexes per pre type;
SmolLM's "smollm" isolates every digit before the GPT-2 split, as its original tokenizer.json
did). Control tokens are special (skipped when decoding), user-defined ones are added as is.
BOS is prepended when the file says `add_bos_token`.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from tp_runtime.errors import CheckpointError

log = logging.getLogger("tp_runtime")

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _byte_level(use_regex: bool):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _split(pattern: str):
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)


# tokenizer.ggml.pre -> the pre-tokenizer (llama.cpp's grouping of the names)
PRE_TOKENIZERS = {
    **{name: lambda: _byte_level(True) for name in ("default", "gpt-2", "gpt2", "mpt", "olmo", "jais")},
    **{name: lambda: pre_tokenizers.Sequence([_split(r"\p{N}"), _byte_level(True)]) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell")},
    **{name: lambda: pre_tokenizers.Sequence([_split(_LLAMA3), _byte_level(False)]) for name in ("llama3", "llama-bpe", "llama-v3", "smaug-bpe")},
    **{name: lambda: pre_tokenizers.Sequence([_split(_QWEN2), _byte_level(False)]) for name in ("qwen2", "stablelm2", "deepseek-r1-qwen")},
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


def build_tokenizer(meta: dict[str, Any], source: str) -> Tokenizer | None:
    """The tokenizer the metadata describes; None (with a warning) for a kind not built yet, so
    that token ids still work."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        return None
    if kind != "gpt2":
        log.warning("%s: tokenizer model %r is not supported yet (gpt2-type BPE is); give token ids (--prompt-ids)", source, kind)
        return None
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{source}: tokenizer pre-type {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise CheckpointError(f"{source}: a gpt2-type tokenizer without tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{source}: tokenizer merge {m!r} is not two tokens separated by a space")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_text = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos_text} $A", pair=f"{bos_text} $A {bos_text} $B", special_tokens=[(bos_text, int(bos))])
    return tok
