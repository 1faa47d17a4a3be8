"""Fused RMSNorm (optionally with the residual add) and rotate-half RoPE.

RMSNorm, one program per row of [rows, hidden]:
    r = x + residual (rounded to x's dtype, stored as the new residual)   [fused variant]
    y = weight * (r * rsqrt(mean(r^2) + eps)).to(dtype)        (float32 inside)
    One read of x (and residual), one write of y (and the new residual): the separate
    add, pow, mean, rsqrt, mul, cast and mul of the torch version fuse into one pass.

RoPE, Hugging Face rotate-half layout, one program per (batch, position):
    x1, x2 = x[..., :d/2], x[..., d/2:]
    out[..., :d/2] = x1 * cos[..., :d/2] - x2 * sin[..., :d/2]
    out[..., d/2:] = x2 * cos[..., d/2:] + x1 * sin[..., d/2:]
    The program loads the position's cos/sin row once and rotates every head of the
    position with it; the in-place variant rotates q and k in one launch.

How it differs from the reference (reference.rms_norm / rms_norm_residual / apply_rope):
    - RMSNorm rounds exactly where the reference does (to x's dtype after normalising, once
      more after the weight); only the float32 sum order of mean(x^2) differs.
    - RoPE computes x*cos + rotated*sin in float32 and rounds once; the reference rounds
      each product and the sum in the input dtype (fp16/bf16 differ by about one ulp;
      float32 agrees to about 1e-6).

Caution:
    - RMSNorm holds a whole row in registers: hidden up to 64K elements per row; rows must
      have a unit stride in their last dimension (other dimensions may be strided if they
      flatten to rows without a copy; otherwise a copy is made).
    - RoPE needs an even head_dim; cos/sin must broadcast to [batch, 1, seq, head_dim].
    - The in-place RoPE writes into q and k: they must not overlap each other (views of
      one fused qkv buffer, as the model makes, do not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(
    X, RES, W, Y, RES_OUT,
    stride_x, stride_res, stride_y, stride_res_out,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(RES + row * stride_res + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # as torch's x + r rounds
        tl.store(RES_OUT + row * stride_res_out + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., hidden] -> [rows, hidden] with a unit last stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_rms(x, residual, weight, eps):
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} for hidden {hidden}")
    block = triton.next_power_of_2(hidden)
    if block > 65536:
        raise ValueError(f"rms_norm: hidden {hidden} is above the kernel's 65536")
    x2 = _rows(x)
    out = _empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    y2 = out.view(-1, hidden)
    n = x2.shape[0]
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"rms_norm_residual: residual {tuple(residual.shape)} {residual.dtype} for x {tuple(x.shape)} {x.dtype}")
        r2 = _rows(residual)
        new_res = _empty(x.shape, dtype=x.dtype, device=x.device)
        nr2 = new_res.view(-1, hidden)
    else:
        r2 = nr2 = x2  # unused pointers
        new_res = None
    if n:
        _rms_norm_fwd[(n,)](
            x2, r2, weight, y2, nr2,
            x2.stride(0), r2.stride(0), y2.stride(0), nr2.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )
    return out, new_res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., hidden] with weight [hidden]; same semantics as reference.rms_norm."""
    return _launch_rms(x, None, weight, eps)[0]


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; x, residual [..., hidden]."""
    return _launch_rms(x, residual, weight, eps)


@triton.jit
def _rope_heads(
    X, OUT, cos1, sin1, cos2, sin2,
    b, s, heads,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_ob, stride_oh, stride_os, stride_od,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    for h0 in range(0, heads, BLOCK_H):
        hh = h0 + offs_h
        ok = (hh[:, None] < heads) & (offs_d[None, :] < HALF)
        x_base = X + b * stride_xb + s * stride_xs + hh[:, None].to(tl.int64) * stride_xh + offs_d[None, :] * stride_xd
        x1 = tl.load(x_base, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + HALF * stride_xd, mask=ok, other=0.0).to(tl.float32)
        o1 = x1 * cos1[None, :] - x2 * sin1[None, :]
        o2 = x2 * cos2[None, :] + x1 * sin2[None, :]
        o_base = OUT + b * stride_ob + s * stride_os + hh[:, None].to(tl.int64) * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_base, o1.to(OUT.dtype.element_ty), mask=ok)
        tl.store(o_base + HALF * stride_od, o2.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _rope_fwd(
    X, X_OUT, Y, Y_OUT, COS, SIN,
    seq, x_heads, y_heads,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_xob, stride_xoh, stride_xos, stride_xod,
    stride_yb, stride_yh, stride_ys, stride_yd,
    stride_yob, stride_yoh, stride_yos, stride_yod,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    HAS_Y: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // seq).to(tl.int64)
    s = (pid % seq).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    c_base = COS + b * stride_cb + s * stride_cs + offs_d * stride_cd
    s_base = SIN + b * stride_sb + s * stride_ss + offs_d * stride_sd
    cos1 = tl.load(c_base, mask=d_ok, other=0.0).to(tl.float32)
    cos2 = tl.load(c_base + HALF * stride_cd, mask=d_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(s_base, mask=d_ok, other=0.0).to(tl.float32)
    sin2 = tl.load(s_base + HALF * stride_sd, mask=d_ok, other=0.0).to(tl.float32)
    _rope_heads(X, X_OUT, cos1, sin1, cos2, sin2, b, s, x_heads,
                stride_xb, stride_xh, stride_xs, stride_xd,
                stride_xob, stride_xoh, stride_xos, stride_xod,
                HALF, BLOCK_H, BLOCK_HALF)
    if HAS_Y:
        _rope_heads(Y, Y_OUT, cos1, sin1, cos2, sin2, b, s, y_heads,
                    stride_yb, stride_yh, stride_ys, stride_yd,
                    stride_yob, stride_yoh, stride_yos, stride_yod,
                    HALF, BLOCK_H, BLOCK_HALF)


def _cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    batch, _, seq, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"apply_rope: head_dim {head_dim} is odd")
    try:
        cos = cos.expand(batch, 1, seq, head_dim)
        sin = sin.expand(batch, 1, seq, head_dim)
    except RuntimeError as e:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} do not broadcast to {(batch, 1, seq, head_dim)}") from e
    return cos, sin


def _launch_rope(x, x_out, y, y_out, cos, sin):
    batch, x_heads, seq, head_dim = x.shape
    half = head_dim // 2
    y_heads = y.shape[1] if y is not None else 0
    if y is not None and (y.shape[0], y.shape[2], y.shape[3]) != (batch, seq, head_dim):
        raise ValueError(f"apply_rope_qk_: q {tuple(x.shape)} and k {tuple(y.shape)} disagree")
    if batch * seq == 0:
        return
    cs, ss = cos.stride(), sin.stride()
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(x_heads, y_heads, 1)), max(1, 2048 // block_half))
    yy, yo = (y, y_out) if y is not None else (x, x_out)  # unused when HAS_Y is off
    _rope_fwd[(batch * seq,)](
        x, x_out, yy, yo, cos, sin,
        seq, x_heads, y_heads,
        *x.stride(), *x_out.stride(), *yy.stride(), *yo.stride(),
        cs[0], cs[2], cs[3], ss[0], ss[2], ss[3],
        HAS_Y=y is not None,
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_H=block_h,
        num_warps=4,
    )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE into a new tensor. x [batch, heads, seq, head_dim] (any strides);
    cos, sin broadcastable to [batch, 1, seq, head_dim]. Same semantics as reference.apply_rope."""
    cos, sin = _cos_sin(x, cos, sin)
    out = _empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    _launch_rope(x, out, None, None, cos, sin)
    return out


def apply_rope_qk_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [batch, q_heads, seq, hd] and k [batch, kv_heads, seq, hd] in place, one launch; returns (q, k)."""
    cos, sin = _cos_sin(q, cos, sin)
    _launch_rope(q, q, k, k, cos, sin)
    return q, k


# every allocation goes through here, so that tests can poison it (fill with NaN)
_empty = torch.empty
