"""RMSNorm, replicated on every rank."""

from __future__ import annotations

import torch
from torch import nn

from tp_runtime import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual: (norm(x + residual), x + residual) in one fused kernel."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.rms_norm_residual(x, residual, self.weight, self.eps)

    def fused_problem(self) -> str | None:
        return None

    def bind_decode(self, binder, out: torch.Tensor, add: bool):
        """The fused step's norm into out (the next GEMV's input): of res, or of h + res with
        the sum written back to res (add)."""
        return binder.rms_norm(self.weight, self.eps, out, add)
