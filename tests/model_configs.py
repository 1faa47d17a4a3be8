"""Small Llama-family configs for the pure tests (sharding, placement): every shape a keyword."""

from tp_runtime.checkpoint.synthetic import llama_config_dict
from tp_runtime.config import ModelConfig


def make_raw(
    heads: int,
    kv_heads: int,
    *,
    head_dim: int = 4,
    hidden: int = 24,
    inter: int = 37,
    vocab: int = 101,
    layers: int = 1,
    architecture: str = "LlamaForCausalLM",
    **extra,
) -> dict:
    return llama_config_dict(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=vocab,
        architecture=architecture,
        head_dim=head_dim,
        **extra,
    )


def make_cfg(heads: int, kv_heads: int, **kw) -> ModelConfig:
    return ModelConfig.from_dict(make_raw(heads, kv_heads, **kw))
