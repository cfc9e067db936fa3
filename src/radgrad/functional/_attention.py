"""RAD scaled dot-product attention: exact queries and keys, a sketch of the values.

NOTE [Attention from a sketch of V]
    With ``P = softmax(q k^T * scale + bias)``, ``Pd = P * m / (1 - p)`` (the
    dropout mask ``m``) and ``out = Pd v``, torch's backward is
        dv = Pd^T dout,
        dPd = dout v^T,   dP = dPd * m / (1 - p),
        dS = P * (dP - rowsum(P * dP)),   dq = dS k * scale,   dk = dS^T q * scale.
    ``P`` depends on ``q`` and ``k`` through a softmax, so they are kept
    exact and ``P`` is recomputed in the backward pass (as flash attention
    does) instead of being stored: no ``L x S`` tensor is saved. ``v``
    enters only ``dPd``, linearly, so a sketch of it (one row per key
    position) gives unbiased ``dq`` and ``dk``; ``dv`` is exact. The dropout
    mask is kept as one bit per entry. Without dropout, the backward pass
    runs torch's own fused kernels (forward, then backward) on the estimate
    of ``v``: the same formulas, with ``rowsum(P * dP)`` computed from it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad import bits
from radgrad.functional._base import _DEFAULT, _RADFunction, _check_input, _packed, _sketch_from
from radgrad.saved import save_for_backward, saved_tensors
from radgrad.sketch import SketchConfig

__all__ = ["scaled_dot_product_attention"]


def _probabilities(q: Tensor, k: Tensor, bias: Tensor | None, scale: float, is_causal: bool) -> Tensor:
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if bias is None:
        return torch.softmax(scores, -1)
    scores = scores.add_(bias)
    if is_causal and q.shape[-2] <= k.shape[-2]:
        return torch.softmax(scores, -1)  # every row keeps its first key
    # torch's math path: a row with every key masked gives zeros, not NaN
    return torch._safe_softmax(scores, -1)


def _bias(attn_mask: Tensor | None, is_causal: bool, q: Tensor, k: Tensor) -> Tensor | None:
    """The additive mask torch's math path builds from ``attn_mask`` or ``is_causal``."""
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
        attn_mask.logical_not(), float("-inf"))


def _compact(t: Tensor) -> Tensor:
    """``t``, copied when it is a view that would keep a larger storage alive."""
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.contiguous() if not t.is_contiguous() else t.clone()
    return t


class _Attention(_RADFunction):
    @staticmethod
    def forward(q, k, v, attn_mask, dropout_p, is_causal, scale, config):
        if dropout_p == 0.0:
            output = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=scale)
            mask = None
        else:
            probs = _probabilities(q, k, _bias(attn_mask, is_causal, q, k), scale, is_causal)
            probs, mask = torch.ops.aten.native_dropout(probs, dropout_p, True)
            output = torch.matmul(probs, v)
        output, *parts = _packed(output, v, config, v.dim() - 1)
        return output, *parts, mask

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        q, k, v, attn_mask, dropout_p, is_causal, scale, config = inputs
        *parts, mask = outputs[1:]
        ctx.options = (dropout_p, is_causal, scale)
        sketch = _sketch_from(ctx, parts, v, config, v.dim() - 1)
        if mask is not None:
            ctx.mark_non_differentiable(mask)
            mask = bits.pack(mask)
        save_for_backward(ctx, _compact(q), _compact(k), sketch, attn_mask, mask)

    @staticmethod
    def backward(ctx, grad, *_):
        q, k, v, attn_mask, mask = saved_tensors(ctx, unpack=False)
        dropout_p, is_causal, scale = ctx.options
        if mask is None:
            return (*_fused_backward(grad, q, k, v.unpack(), attn_mask, is_causal, scale, ctx.needs_input_grad),
                    None, None, None, None, None)
        probs = _probabilities(q, k, _bias(attn_mask, is_causal, q, k), scale, is_causal)
        grad_probs = torch.matmul(grad, v.unpack().transpose(-2, -1))
        kept, keep = bits.unpack(mask), 1.0 / (1.0 - dropout_p)
        grad_probs = torch.ops.aten.threshold_backward(grad_probs, kept, 0).mul_(keep)
        dropped = torch.ops.aten.threshold_backward(probs, kept, 0).mul_(keep)
        grad_v = torch.matmul(dropped.transpose(-2, -1), grad) if ctx.needs_input_grad[2] else None
        grad_scores = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
        grad_q = torch.matmul(grad_scores, k).mul_(scale) if ctx.needs_input_grad[0] else None
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q).mul_(scale) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad_v, None, None, None, None, None


def _fused_backward(grad, q, k, v_estimate, attn_mask, is_causal, scale, needs) -> tuple[Tensor | None, ...]:
    """Without dropout: torch's own attention kernels, run forward and backward on the estimate of v.

    Its ``dv = P^T grad`` does not read v (exact); its ``dq`` and ``dk`` are
    linear in v (unbiased). torch picks its fastest kernel for the device.
    """
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip((q, k, v_estimate), needs)]
        out = F.scaled_dot_product_attention(*leaves, attn_mask, 0.0, is_causal, scale=scale)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
    return tuple(next(grads) if t.requires_grad else None for t in leaves)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    config: SketchConfig = _DEFAULT,
) -> Tensor:
    """RAD ``F.scaled_dot_product_attention``: saves exact queries and keys and a sketch of the values.

    Exact: the output (torch's own kernel when ``dropout_p == 0``), the
    gradient with respect to ``value``. Estimated (unbiased): the gradients
    with respect to ``query`` and ``key`` (NOTE [Attention from a sketch of
    V]). The attention matrix is recomputed in the backward pass, never
    stored; a dropout mask is stored as bits.

    Runs torch's function unchanged when nothing needs a gradient, for an
    exact config, with ``enable_gqa=True``, with a mask that needs a
    gradient, or when the batch dimensions of query, key and value differ.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_input(f"functional.scaled_dot_product_attention: {name}", t)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(
            f"radgrad.functional.scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}")
    needs = any(t.requires_grad for t in (query, key, value)) and torch.is_grad_enabled()
    plain = (config.exact or not needs or enable_gqa or query.dim() < 2
             or (attn_mask is not None and attn_mask.requires_grad)
             or not query.shape[:-2] == key.shape[:-2] == value.shape[:-2])
    if plain:
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("radgrad.functional.scaled_dot_product_attention: pass attn_mask or is_causal, not both")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return _Attention.run(query, key, value, attn_mask, dropout_p, is_causal, scale, config)[0]
