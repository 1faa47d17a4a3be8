"""A decoder layer's weights as named tensors, for the tiers that copy whole layers (a host
copy, an offload folder): whatever form its modules keep them in (float parameters, int8 values
and scales, GGUF blocks in parts whose layout differs from layer to layer)."""

from __future__ import annotations

import torch
from torch import nn


def weight_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A decoder layer's weights by name, as its state_dict holds them: its parameters and the
    persistent buffers its linears keep their weights in (int8 values and scales, GGUF blocks);
    not the tables a layer builds itself (RoPE, head maps) or derives (`rederive`)."""
    out = dict(module.named_parameters())
    for prefix, m in module.named_modules():
        if hasattr(m, "load_weight"):
            skip = m._non_persistent_buffers_set
            out.update((f"{prefix}.{n}" if prefix else n, b) for n, b in m._buffers.items() if b is not None and n not in skip)
    return out


def rederive(module: nn.Module) -> None:
    """After weights were copied in by name: rebuild what modules derive from them (the int8
    kernel's block sums)."""
    for m in module.modules():
        if hasattr(m, "rederive"):
            m.rederive()


def block_layouts(module: nn.Module) -> dict[str, list[list]]:
    """Module name -> its parts' layout, for each linear that holds GGUF blocks in parts."""
    return {name: m.layout() for name, m in module.named_modules() if hasattr(m, "set_layout")}


def set_block_layouts(module: nn.Module, layouts: dict[str, list[list]], tensors: dict[str, torch.Tensor]) -> None:
    """Give `module`'s block linears the parts `layouts` names (where theirs differ), shaped as
    `tensors` (full names) holds them."""
    for name, layout in layouts.items():
        m = module.get_submodule(name)
        if m.layout() != layout:
            prefix = f"{name}." if name else ""
            m.set_layout(layout, {p[3]: tensors[prefix + p[3]] for p in layout})
