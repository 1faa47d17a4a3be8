"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from tp_runtime.config import ModelConfig
from tp_runtime.errors import ConfigError
from tp_runtime.model.linear import FLOAT, LinearKinds
from tp_runtime.model.llama import LlamaForCausalLM
from tp_runtime.model.quant import INT8

# Mistral and Qwen2 are Llama blocks with different flags (bias, window), read into ModelConfig.
MODEL_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,  # the MLP of every layer a SparseMoe (model/moe.py)
    "Qwen2MoeForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "DeepseekV3ForCausalLM": LlamaForCausalLM,  # attention model/mla.py's MlaAttention, experts SparseMoe
}


def model_class(cfg: ModelConfig) -> type:
    try:
        return MODEL_CLASSES[cfg.architecture]
    except KeyError:
        raise ConfigError(f"architecture {cfg.architecture!r} has no model class; supported: {', '.join(sorted(MODEL_CLASSES))}") from None


# --quantize -> the linear classes of that weight format (None: the checkpoint's floats)
LINEAR_KINDS = {None: FLOAT, "int8": INT8}


def linear_kinds(quantize: str | None, blocks: bool = False) -> LinearKinds:
    """The linear classes of the weight format: `blocks` keeps a GGUF file's quantized blocks
    (model/blocks.py) where no --quantize asks for another format; int4 quantises into such
    blocks (model/int4.py)."""
    if blocks and quantize is None:
        from tp_runtime.model.blocks import BLOCKS

        return BLOCKS
    if quantize == "int4":
        from tp_runtime.model.int4 import INT4

        return INT4
    try:
        return LINEAR_KINDS[quantize]
    except KeyError:
        raise ConfigError(f"--quantize {quantize}: supported are {', '.join(k for k in LINEAR_KINDS if k)}") from None
