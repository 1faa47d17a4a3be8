"""config.py: parsing Hugging Face config.json (transformers 4 and 5 styles), validation,
runtime resolution; model/rope.py frequencies against transformers' own RoPE init."""

from __future__ import annotations

import json

import pytest
import torch

from tp_runtime.checkpoint.synthetic import llama_config_dict
from tp_runtime.config import MOE_FAMILIES, SUPPORTED_ARCHITECTURES, ModelConfig, RopeConfig, RuntimeConfig
from tp_runtime.errors import ConfigError
from tp_runtime.model.rope import inv_frequencies


def raw_config(*, architecture: str = "LlamaForCausalLM", rope: dict | None = None, drop=(), **kw) -> dict:
    """A config.json dict; `rope` replaces the rope keys (rope_theta / rope_scaling / rope_parameters)."""
    base = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, vocab_size=128)
    raw = llama_config_dict(architecture=architecture, **{**base, **kw})  # unknown keys go in as extras
    if rope is not None:
        raw.pop("rope_theta", None)
        raw.update(rope)
    for k in drop:
        raw.pop(k, None)
    return raw


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# (expected RopeConfig, [equivalent rope key sets in transformers 4 and 5 styles])
ROPE_STYLES = {
    "default": (
        RopeConfig(theta=500000.0),
        [
            {"rope_theta": 500000.0},
            {"rope_theta": 500000.0, "rope_scaling": None},
            {"rope_theta": 500000.0, "rope_scaling": {"type": "default"}},
            {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
        ],
    ),
    "linear": (
        RopeConfig(theta=10000.0, rope_type="linear", factor=4.0),
        [
            {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
            {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
            {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
        ],
    ),
    "llama3": (
        RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
        [
            {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}},
            {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}},
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}},
        ],
    ),
}


@pytest.mark.parametrize("kind", sorted(ROPE_STYLES))
def test_rope_styles_parse_the_same(kind):
    expected, variants = ROPE_STYLES[kind]
    parsed = [ModelConfig.from_dict(raw_config(rope=v)).rope for v in variants]
    for v, p in zip(variants, parsed):
        assert p == expected, v


def test_rope_theta_defaults_to_10000():
    cfg = ModelConfig.from_dict(raw_config(rope={}))
    assert cfg.rope == RopeConfig(theta=10000.0)


@pytest.mark.parametrize("style", ["v4", "v5"])
@pytest.mark.parametrize("missing", ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"])
def test_llama3_missing_key(style, missing):
    params = {k: v for k, v in LLAMA3.items() if k != missing}
    if style == "v4":
        rope = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **params}}
    else:
        rope = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **params}}
    with pytest.raises(ConfigError, match=missing):
        ModelConfig.from_dict(raw_config(rope=rope))


def test_linear_missing_factor():
    with pytest.raises(ConfigError, match="factor"):
        ModelConfig.from_dict(raw_config(rope={"rope_scaling": {"type": "linear"}}))


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope", "su"])
@pytest.mark.parametrize("style", ["v4", "v5"])
def test_unsupported_rope_type(rope_type, style):
    if style == "v4":
        rope = {"rope_theta": 10000.0, "rope_scaling": {"type": rope_type, "factor": 2.0}}
    else:
        rope = {"rope_parameters": {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}}
    with pytest.raises(ConfigError, match=rope_type):
        ModelConfig.from_dict(raw_config(rope=rope))


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "GemmaForCausalLM", "LlamaModel"])
def test_unsupported_architecture(arch):
    raw = raw_config()
    raw["architectures"] = [arch]
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_dict(raw)
    msg = str(ei.value)
    assert arch in msg
    for supported in SUPPORTED_ARCHITECTURES:
        assert supported in msg, msg


def test_missing_architectures_and_model_type():
    raw = raw_config()
    del raw["architectures"]
    raw.pop("model_type", None)
    with pytest.raises(ConfigError, match="neither 'architectures' nor 'model_type'"):
        ModelConfig.from_dict(raw)


def test_unsupported_model_type_without_architectures():
    raw = raw_config()
    del raw["architectures"]
    raw["model_type"] = "gpt2"
    with pytest.raises(ConfigError, match="model_type .gpt2. is not supported.*llama, mistral, mixtral, qwen2, qwen2_moe, qwen3_moe"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("config_class, arch", [("LlamaConfig", "LlamaForCausalLM"), ("MistralConfig", "MistralForCausalLM"), ("Qwen2Config", "Qwen2ForCausalLM")])
def test_architecture_from_model_type(tmp_path, config_class, arch):
    """A config.json as transformers writes it from a bare config object (no `architectures`,
    as its GGUF loader and many converters leave it): the class comes from `model_type`."""
    import transformers
    hf_cfg = getattr(transformers, config_class)(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=96, vocab_size=128)
    hf_cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert not raw.get("architectures")
    cfg = ModelConfig.from_dict(raw)
    assert cfg.architecture == arch and cfg.family == SUPPORTED_ARCHITECTURES[arch]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads) == (64, 2, 2)


@pytest.mark.parametrize("arch, family", sorted((a, f) for a, f in SUPPORTED_ARCHITECTURES.items() if f not in MOE_FAMILIES))  # MoE: tests/test_moe.py
def test_families(arch, family):
    cfg = ModelConfig.from_dict(raw_config(architecture=arch))
    assert (cfg.architecture, cfg.family) == (arch, family)
    # Qwen2 always has q/k/v biases, no o_proj bias
    assert cfg.qkv_bias == (family == "qwen2")
    assert not cfg.o_bias


def test_head_dim_explicit_and_derived():
    explicit = ModelConfig.from_dict(raw_config(hidden_size=64, num_heads=4, head_dim=32))
    assert explicit.head_dim == 32
    assert explicit.q_size == 128 and explicit.kv_size == 64

    raw = raw_config(hidden_size=64, num_heads=4)
    del raw["head_dim"]
    derived = ModelConfig.from_dict(raw)
    assert derived.head_dim == 16
    assert derived.q_size == 64 and derived.kv_size == 32

    raw["head_dim"] = None  # some configs write null
    assert ModelConfig.from_dict(raw).head_dim == 16


def test_head_dim_not_derivable():
    raw = raw_config(hidden_size=60, num_heads=8, num_kv_heads=8)
    del raw["head_dim"]
    with pytest.raises(ConfigError, match="head_dim"):
        ModelConfig.from_dict(raw)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig.from_dict(raw_config(num_heads=6, num_kv_heads=4, head_dim=8))


def test_kv_heads_default_to_heads():
    raw = raw_config(num_heads=4)
    del raw["num_key_value_heads"]
    assert ModelConfig.from_dict(raw).num_kv_heads == 4


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"])
def test_required_key_missing(key):
    raw = raw_config(drop=[key])
    if key in ("hidden_size", "num_attention_heads"):
        raw["head_dim"] = 16
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(raw)


def _write_model_dir(path, raw, gen=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    if gen is not None:
        (path / "generation_config.json").write_text(json.dumps(gen))
    return path


@pytest.mark.parametrize(
    "cfg_eos, gen_eos, expected",
    [
        (2, [2, 7, 9], (2, 7, 9)),
        ([2, 3], 4, (2, 3, 4)),
        ([5, 2], [2, 5], (5, 2)),
        (None, [7], (7,)),
        (2, None, (2,)),
    ],
)
def test_eos_merged_from_generation_config(tmp_path, cfg_eos, gen_eos, expected):
    raw = raw_config(eos_token_id=cfg_eos)
    d = _write_model_dir(tmp_path / "m", raw, gen={"bos_token_id": 1, "eos_token_id": gen_eos})
    assert ModelConfig.from_model_dir(d).eos_token_ids == expected


def test_eos_without_generation_config(tmp_path):
    d = _write_model_dir(tmp_path / "m", raw_config(eos_token_id=[2, 3]))
    cfg = ModelConfig.from_model_dir(d)
    assert cfg.eos_token_ids == (2, 3)
    assert cfg == ModelConfig.from_dict(raw_config(eos_token_id=[2, 3]))


def test_missing_model_dir(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_model_dir(missing)
    assert str(missing) in str(ei.value)


def test_model_dir_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_model_dir(tmp_path / "m")


def test_model_dir_bad_json(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_model_dir(d)


# ---------------------------------------------------------------------------------------------
# sliding window


@pytest.mark.parametrize("use", [False, None])
def test_qwen2_sliding_window_disabled(use):
    extra = {"sliding_window": 4096}
    if use is not None:
        extra["use_sliding_window"] = use
    cfg = ModelConfig.from_dict(raw_config(architecture="Qwen2ForCausalLM", **extra))
    assert cfg.sliding_window is None
    assert RuntimeConfig(max_seq_len=8192).resolve_max_seq_len(cfg) == 8192


def test_qwen2_sliding_window_enabled():
    cfg = ModelConfig.from_dict(raw_config(architecture="Qwen2ForCausalLM", sliding_window=64, use_sliding_window=True))
    assert cfg.sliding_window == 64


def test_mistral_sliding_window_limits_max_seq_len():
    cfg = ModelConfig.from_dict(raw_config(architecture="MistralForCausalLM", sliding_window=64))
    assert cfg.sliding_window == 64
    with pytest.raises(ConfigError, match=r"(?<!\d)64(?!\d)") as ei:
        RuntimeConfig(max_seq_len=128).resolve_max_seq_len(cfg)
    assert "sliding window" in str(ei.value)
    # the default (min(max_position_embeddings, 4096) = 2048) is past the window as well
    with pytest.raises(ConfigError):
        RuntimeConfig().resolve_max_seq_len(cfg)
    assert RuntimeConfig(max_seq_len=64).resolve_max_seq_len(cfg) == 64
    assert RuntimeConfig(max_seq_len=10).resolve_max_seq_len(cfg) == 10


def test_mistral_without_sliding_window():
    cfg = ModelConfig.from_dict(raw_config(architecture="MistralForCausalLM", sliding_window=None))
    assert cfg.sliding_window is None
    assert RuntimeConfig(max_seq_len=8192).resolve_max_seq_len(cfg) == 8192


def test_default_max_seq_len():
    small = ModelConfig.from_dict(raw_config(max_position_embeddings=512))
    big = ModelConfig.from_dict(raw_config(max_position_embeddings=131072))
    assert RuntimeConfig().resolve_max_seq_len(small) == 512
    assert RuntimeConfig().resolve_max_seq_len(big) == 4096


# ---------------------------------------------------------------------------------------------
# dtype


@pytest.mark.parametrize(
    "ckpt, device, expected",
    [
        ("float16", "cpu", "float32"),
        ("float16", "cuda", "float16"),
        ("bfloat16", "cpu", "bfloat16"),
        ("bfloat16", "cuda", "bfloat16"),
        ("float32", "cpu", "float32"),
        (None, "cpu", "float32"),
        ("float64", "cpu", "float32"),
    ],
)
def test_resolve_dtype(ckpt, device, expected):
    raw = raw_config()
    del raw["torch_dtype"]
    if ckpt is not None:
        raw["dtype"] = ckpt  # transformers 5 key
    cfg = ModelConfig.from_dict(raw)
    assert RuntimeConfig().resolve_dtype(cfg, device) == expected


def test_resolve_dtype_reads_torch_dtype_and_explicit_wins():
    cfg = ModelConfig.from_dict(raw_config(dtype="bfloat16"))  # written as torch_dtype (transformers 4)
    assert cfg.checkpoint_dtype == "bfloat16"
    assert RuntimeConfig().resolve_dtype(cfg, "cpu") == "bfloat16"
    assert RuntimeConfig(dtype="float32").resolve_dtype(cfg, "cpu") == "float32"
    assert RuntimeConfig(dtype="float16").resolve_dtype(cfg, "cpu") == "float16"


def test_runtime_config_validation():
    with pytest.raises(ConfigError, match="float8"):
        RuntimeConfig(dtype="float8")
    with pytest.raises(ConfigError):
        RuntimeConfig(max_seq_len=0)


# ---------------------------------------------------------------------------------------------
# RoPE frequencies against transformers

ROPE_CASES = [
    # (id, head_dim, rope keys as written in config.json)
    ("default-10k-64", 64, {"rope_theta": 10000.0}),
    ("default-500k-128", 128, {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    ("default-1M-16", 16, {"rope_theta": 1000000.0}),
    ("linear-2", 64, {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
    ("linear-8", 128, {"rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 500000.0}}),
    ("llama3.1", 128, {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}}),
    ("llama3.2", 64, {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **dict(LLAMA3, factor=32.0)}}),
    ("llama3-small-ctx", 32, {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("llama3-bands", 64, {"rope_theta": 10000.0, "rope_scaling": {"type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 512}}),
]


@pytest.mark.parametrize("head_dim, rope", [c[1:] for c in ROPE_CASES], ids=[c[0] for c in ROPE_CASES])
def test_inv_frequencies_match_transformers(head_dim, rope):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = raw_config(hidden_size=4 * head_dim, num_heads=4, num_kv_heads=2, head_dim=head_dim, max_position_embeddings=131072, rope=rope)
    ours_cfg = ModelConfig.from_dict(raw)
    ours = inv_frequencies(ours_cfg.rope, ours_cfg.head_dim)

    hf_cfg = transformers.LlamaConfig.from_dict(raw)  # the same config.json, read by transformers
    rope_type = hf_cfg.rope_parameters["rope_type"]
    assert rope_type == ours_cfg.rope.rope_type
    emb = LlamaRotaryEmbedding(hf_cfg)  # picks compute_default_rope_parameters or ROPE_INIT_FUNCTIONS
    assert emb.attention_scaling == 1.0  # none of these types scales cos/sin
    ref = emb.inv_freq
    if rope_type != "default":
        direct, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, torch.device("cpu"))
        assert scaling == 1.0
        torch.testing.assert_close(direct, ref, rtol=0, atol=0)

    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    # tolerance: 1e-6 relative, no absolute slack (frequencies span many decades)
    torch.testing.assert_close(ours, ref.to(torch.float32), rtol=1e-6, atol=0)
    if rope_type == "llama3":
        # the case must exercise all three bands: kept, scaled by 1/factor and blended
        inv = inv_frequencies(RopeConfig(theta=ours_cfg.rope.theta), head_dim)
        ratio = ours / inv
        f = ours_cfg.rope.factor
        kept = torch.isclose(ratio, torch.tensor(1.0))
        scaled = torch.isclose(ratio, torch.tensor(1.0 / f))
        assert scaled.any()
        if head_dim >= 64:  # the small-context case has no kept band
            assert kept.any()
            assert (~kept & ~scaled).any(), "no frequency in the blended band"
