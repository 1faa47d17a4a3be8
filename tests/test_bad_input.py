"""Bad input fails early with a message that names the problem (never a deep torch traceback)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from tp_runtime.config import ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.errors import CheckpointError, ConfigError, GenerationError


@pytest.fixture
def model_copy(small_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(small_model, dst)
    return dst


def _load(path, **runtime):
    return LLM.load(path, ParallelConfig(), RuntimeConfig(show_progress=False, **runtime))


def _rewrite(path, change):
    f = path / "model.safetensors"
    state = load_file(str(f))
    change(state)
    save_file(state, str(f))


def test_missing_tensor_is_named(model_copy):
    _rewrite(model_copy, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \[256, 128\]\)"):
        _load(model_copy)


def test_misshaped_tensor_is_named_with_both_shapes(model_copy):
    def shrink(s):
        s["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 128)

    _rewrite(model_copy, shrink)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight .* has shape \[16, 128\], config implies \[32, 128\]"):
        _load(model_copy)


def test_all_problems_listed_in_one_message(model_copy):
    def damage(s):
        s.pop("model.norm.weight")
        s["extra.weight"] = torch.zeros(2)

    _rewrite(model_copy, damage)
    with pytest.raises(CheckpointError) as info:
        _load(model_copy)
    assert "missing tensor model.norm.weight" in str(info.value)
    assert "unexpected tensor extra.weight" in str(info.value)


def test_unsupported_architecture(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"architecture 'GPT2LMHeadModel' is not supported; supported: .*LlamaForCausalLM"):
        _load(model_copy)


def test_corrupt_safetensors_header(model_copy):
    f = model_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{not json at all!!" + b"#" * 14
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read the safetensors header .* corrupt or truncated"):
        _load(model_copy)


def test_truncated_safetensors_file(model_copy):
    f = model_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        _load(model_copy)


@pytest.mark.parametrize("blocks, problem", [
    ("[1, 2]", "is not a JSON object"),
    ('{"lm_head.weight": "Q3_K"}', "names unknown tensors or types"),
    ('{"model.norm.weight": "Q8_0"}', r"model\.norm\.weight \(F32 \[\d+\]\) is not whole Q8_0 blocks"),
])
def test_bad_block_types_in_a_slices_file(model_copy, blocks, problem):
    """A worker's cache names its GGUF slices' block types in the safetensors metadata: a garbled
    entry is refused naming the file and the tensor."""
    from tp_runtime.checkpoint.safetensors_reader import BLOCKS_KEY

    f = model_copy / "model.safetensors"
    save_file(load_file(str(f)), str(f), metadata={BLOCKS_KEY: blocks})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: .*{problem}"):
        _load(model_copy)


def test_job_config_with_wrong_rope_factors():
    from tp_runtime.checkpoint.synthetic import llama_config_dict
    from tp_runtime.config import EXTRA_KEY, ModelConfig

    raw = llama_config_dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=50)
    assert ModelConfig.from_dict({**raw, EXTRA_KEY: {"rope_freq_factors": [2.0] * 8}}).rope.freq_factors == (2.0,) * 8
    with pytest.raises(ConfigError, match=r"5 rope frequency factors .* for a head size of 16"):
        ModelConfig.from_dict({**raw, EXTRA_KEY: {"rope_freq_factors": [1.0] * 5}})


def test_missing_model_folder():
    with pytest.raises(ConfigError, match=r"model folder '/no/such/model' does not exist"):
        _load("/no/such/model")


def test_prompt_longer_than_context(small_model):
    llm = _load(small_model, max_seq_len=16)
    with pytest.raises(GenerationError, match=r"prompt 0 has 20 tokens, but the context holds 16"):
        list(llm.generate([list(range(3, 23))], SamplingParams(max_new_tokens=4)))


def test_generation_stops_at_context_end(small_model):
    llm = _load(small_model, max_seq_len=16)
    events = list(llm.generate([list(range(3, 13))], SamplingParams(max_new_tokens=50, ignore_eos=True)))
    assert len(events) == 6 and events[-1].finish_reason == "length"


def test_cli_tp_larger_than_heads_fails_before_spawning(small_model):
    r = run_cli(["generate", "--model", str(small_model), "--tp", "9", "--prompt-ids", "1,2,3"], timeout=60)
    assert r.returncode == 1
    assert "tp=9 is larger than the number of attention heads (8)" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_folder_is_one_clean_line(tmp_path):
    r = run_cli(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"], timeout=60)
    assert r.returncode == 1
    assert f"model folder '{tmp_path / 'nope'}' does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_prompt_too_long_on_two_ranks_names_the_rank(small_model):
    r = run_cli(["generate", "--model", str(small_model), "--tp", "2", "--max-seq-len", "8", "--prompt-ids", ",".join(map(str, range(3, 15)))], timeout=90)
    assert r.returncode == 1
    assert "rank 0 failed: GenerationError: prompt 0 has 12 tokens, but the context holds 8" in r.stderr or "rank 1 failed: GenerationError: prompt 0 has 12 tokens" in r.stderr
    assert "Traceback" not in r.stderr
