"""A model's chat template (Jinja, as transformers and llama.cpp render it) turned into a prompt.

Rendered in jinja2's sandbox with the globals templates expect (`raise_exception`,
`strftime_now`, `bos_token`, `eos_token`) and transformers' whitespace settings, so that the
text equals `tokenizer.apply_chat_template(..., tokenize=False)`; the text is then tokenized
without adding BOS again (the template writes what it wants).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from tp_runtime.errors import ConfigError, GenerationError


def render_chat(template: str, messages: list[dict[str, Any]], bos_token: str = "", eos_token: str = "", add_generation_prompt: bool = True) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise GenerationError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise ConfigError(f"the model's chat template cannot be rendered: {e}") from None


def chat_prompt_ids(tokenizer, template: str | None, messages: list[dict[str, Any]], bos_id: int | None, eos_ids: tuple[int, ...]) -> list[int]:
    """Token ids of `messages` through the chat template, ready for the assistant's answer."""
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer: --chat needs one")
    if not template:
        raise ConfigError("this model has no chat template (tokenizer_config.json chat_template, or the GGUF's tokenizer.chat_template): drop --chat")
    bos = tokenizer.id_to_token(bos_id) if bos_id is not None else ""
    eos = tokenizer.id_to_token(eos_ids[0]) if eos_ids else ""
    text = render_chat(template, messages, bos or "", eos or "")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise GenerationError("the chat template rendered an empty prompt")
    return ids
