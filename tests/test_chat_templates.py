"""Chat templates rendered as transformers renders them (Llama-3, Mistral and ChatML templates),
token ids with exactly one BOS, a template's raise_exception a clear error; and streamed text:
a character split across tokens never shows half, the deltas add up to the whole text."""

import pytest

from tp_runtime.checkpoint.chat import chat_prompt_ids, render_chat
from tp_runtime.checkpoint.tokenizer import load_tokenizer
from tp_runtime.errors import GenerationError
from tp_runtime.serve.text import TextStream

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEMPLATES = {"llama3": LLAMA3, "mistral": MISTRAL, "chatml": CHATML}
CONVERSATION = [{"role": "user", "content": "  What is 2 + 2?  "}, {"role": "assistant", "content": "4."}, {"role": "user", "content": "And times 3? ünïcode ✓"}]


@pytest.fixture(scope="module")
def hf_tokenizer(small_model):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(small_model / "tokenizer.json"), bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_text_and_ids_equal_transformers(hf_tokenizer, small_model, name):
    template = TEMPLATES[name]
    hf_tokenizer.chat_template = template
    for messages in (CONVERSATION, CONVERSATION[:1]):
        want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(template, messages, "<s>", "</s>") == want
        ours = chat_prompt_ids(load_tokenizer(small_model), template, messages, hf_tokenizer.bos_token_id, (hf_tokenizer.eos_token_id,))
        theirs = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        assert ours == list(theirs)
        assert ours.count(hf_tokenizer.bos_token_id) == (0 if name == "chatml" else 1)


def test_a_templates_own_refusal_is_a_clear_error(small_model):
    with pytest.raises(GenerationError, match="roles must alternate"):
        chat_prompt_ids(load_tokenizer(small_model), MISTRAL, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 1, (2,))


@pytest.mark.parametrize("stops", [[], ["ü"], ["zz", "✓ x"]])
def test_streamed_text_never_shows_half_a_character_and_adds_up(small_model, stops):
    tok = load_tokenizer(small_model)  # byte-level: a multi-byte character is several tokens
    text = "naïve café — 日本語 ✓ 🎉 über ✓ x end"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.encode()) // 2  # the characters really are split across tokens
    stream = TextStream(tok, stops)
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    whole = tok.decode(ids, skip_special_tokens=True)
    cut = min([whole.find(s) for s in stops if s in whole], default=len(whole))
    assert "".join(deltas) == whole[:cut]
    assert not any("\ufffd" in d for d in deltas)
    assert stream.stopped == (cut < len(whole))
