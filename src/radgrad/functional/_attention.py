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
    position) gives unbiased ``dq`` and ``dk``; ``dv`` is exact. A float
    ``attn_mask`` that needs a gradient (a learned position bias, as Swin's
    or T5's) gets ``dS`` summed over the dimensions it was broadcast along:
    linear in the sketch of v, so unbiased too. The dropout
    mask is kept as one bit per entry. Without dropout, the eager backward
    pass runs torch's own fused kernels (forward, then backward) on the
    estimate of ``v``: the same formulas, with ``rowsum(P * dP)`` computed
    from it. Compiled, it runs the formulas above: the fused path goes
    through ``torch.autograd.grad``, which dynamo cannot trace.
    Grouped-query attention (``enable_gqa``: each key and value head serves
    ``groups`` query heads) stores keys and the sketch of values at their own
    number of heads; the formulas read them repeated per group and sum the
    gradients of each group's copies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from radgrad import bits
from radgrad.functional._base import (
    _DEFAULT, _RADFunction, _check_config, _check_input, _packed, _sketch_from, _torch,
)
from radgrad.functional._linear import linear
from radgrad.functional._source import rebuild, source
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
    return torch.ops.aten._safe_softmax(scores, -1)


def _bias(attn_mask: Tensor | None, is_causal: bool, q: Tensor, k: Tensor) -> Tensor | None:
    """The additive mask torch's math path builds from ``attn_mask`` or ``is_causal``."""
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
        attn_mask.logical_not(), float("-inf"))


def _compact(t: Tensor) -> Tensor:
    """``t``, copied when it is a view that would keep a larger storage alive (eagerly; compiled
    graphs save what their partitioner chooses)."""
    if torch.compiler.is_compiling():
        return t
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.contiguous() if not t.is_contiguous() else t.clone()
    return t


def _repeat(t: Tensor, groups: int) -> Tensor:
    """Key or value heads, each repeated for the ``groups`` query heads it serves."""
    return t if groups == 1 else t.repeat_interleave(groups, -3)


def _fold(grad: Tensor | None, groups: int) -> Tensor | None:
    """The gradient of :func:`_repeat`'s input from that of its output."""
    return grad if grad is None or groups == 1 else grad.unflatten(-3, (-1, groups)).sum(-3)


class _Attention(_RADFunction):
    @staticmethod
    def forward(q, k, v, attn_mask, dropout_p, is_causal, scale, config, recipe, groups, enable_gqa):
        if dropout_p == 0.0:
            output = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=scale,
                                                    enable_gqa=enable_gqa)
            mask = None
        else:
            probs = _probabilities(q, _repeat(k, groups), _bias(attn_mask, is_causal, q, k), scale, is_causal)
            probs, mask = torch.ops.aten.native_dropout(probs, dropout_p, True)
            output = torch.matmul(probs, _repeat(v, groups))
        output, *parts = _packed(output, v, config, v.dim() - 1)
        return output, *parts, mask

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        q, k, v, attn_mask, dropout_p, is_causal, scale, config, recipe, groups, enable_gqa = inputs
        *parts, mask = outputs[1:]
        ctx.options = (dropout_p, is_causal, scale, groups, enable_gqa)
        sketch = _sketch_from(ctx, parts, v, config, v.dim() - 1)
        if mask is not None:
            ctx.mark_non_differentiable(mask)
            mask = bits.pack(mask)
        # q and k themselves, or what rebuilds them (NOTE [Recomputing a projection])
        ctx.program = None if recipe is None else recipe.program
        rebuilt = (None, None) if recipe is None else recipe.program[1]
        exact = [_compact(t) if r is None else None for t, r in zip((q, k), rebuilt)]
        save_for_backward(ctx, *exact, sketch, attn_mask, mask, *(() if recipe is None else recipe.tensors))

    @staticmethod
    def backward(ctx, grad, *_):
        q, k, v, attn_mask, mask, *operands = saved_tensors(ctx, unpack=False)
        if ctx.program is not None:
            q, k = (t if r is None else r for t, r in zip((q, k), rebuild(ctx.program, iter(operands))))
        dropout_p, is_causal, scale, groups, enable_gqa = ctx.options
        if mask is None and not torch.compiler.is_compiling():
            return (*_fused_backward(grad, q, k, v.unpack(), attn_mask, is_causal, scale, enable_gqa,
                                     ctx.needs_input_grad[:4]), None, None, None, None, None, None, None)
        k = _repeat(k, groups)
        probs = _probabilities(q, k, _bias(attn_mask, is_causal, q, k), scale, is_causal)
        grad_probs = torch.matmul(grad, _repeat(v.unpack(), groups).transpose(-2, -1))
        dropped = probs
        if mask is not None:
            kept, keep = bits.unpack(mask), 1.0 / (1.0 - dropout_p)
            grad_probs = torch.ops.aten.threshold_backward(grad_probs, kept, 0).mul_(keep)
            dropped = torch.ops.aten.threshold_backward(probs, kept, 0).mul_(keep)
        grad_v = torch.matmul(dropped.transpose(-2, -1), grad) if ctx.needs_input_grad[2] else None
        grad_scores = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
        grad_q = torch.matmul(grad_scores, k).mul_(scale) if ctx.needs_input_grad[0] else None
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q).mul_(scale) if ctx.needs_input_grad[1] else None
        grad_mask = grad_scores.sum_to_size(attn_mask.shape) if ctx.needs_input_grad[3] else None
        return (grad_q, _fold(grad_k, groups), _fold(grad_v, groups), grad_mask,
                None, None, None, None, None, None, None)


def _fused_backward(grad, q, k, v_estimate, attn_mask, is_causal, scale, enable_gqa,
                    needs) -> tuple[Tensor | None, ...]:
    """Without dropout: torch's own attention kernels, run forward and backward on the estimate of v.

    Its ``dv = P^T grad`` does not read v (exact); its ``dq``, ``dk`` and
    mask gradient are linear in v (unbiased). torch picks its fastest kernel
    for the device.
    """
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip((q, k, v_estimate, attn_mask), needs)]
        out = F.scaled_dot_product_attention(*leaves, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in leaves)


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
    with respect to ``query``, ``key`` and a float ``attn_mask`` that needs
    one (NOTE [Attention from a sketch of V]). The attention matrix is recomputed in the backward pass, never
    stored; a dropout mask is stored as bits.

    With ``enable_gqa=True``, key and value may have fewer heads (dimension
    -3) than query, a divisor of them; they are stored at their own count,
    as is a single key and value head broadcast to every query head.
    Runs torch's function unchanged when nothing needs a gradient, for an
    exact config, or when the batch dimensions of query, key and value
    differ otherwise.
    """
    _check_config("functional.scaled_dot_product_attention", config)
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_input(f"functional.scaled_dot_product_attention: {name}", t)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(
            f"radgrad.functional.scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}")
    needs = (any(t.requires_grad for t in (query, key, value, attn_mask) if t is not None)
             and torch.is_grad_enabled())
    groups = _groups(query, key, value) if enable_gqa else _broadcast_heads(query, key, value)
    plain = (config.exact or not needs or query.dim() < 2 or groups is None
             or not (groups > 1 or query.shape[:-2] == key.shape[:-2] == value.shape[:-2]))
    if plain:
        return _torch(F.scaled_dot_product_attention, query, key, value, attn_mask, dropout_p, is_causal,
                      scale=scale, enable_gqa=enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("radgrad.functional.scaled_dot_product_attention: pass attn_mask or is_causal, not both")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    recipe = source(query, key)
    return _Attention.run(query, key, value, attn_mask, dropout_p, is_causal, scale, config, recipe, groups,
                          enable_gqa)[0]


def _broadcast_heads(query: Tensor, key: Tensor, value: Tensor) -> int:
    """Query heads per key and value head when one key and value head broadcasts to every query head
    (multi-query attention written without ``enable_gqa``, as Falcon's), else 1."""
    if query.dim() < 3 or not key.shape[-3] == value.shape[-3] == 1 or query.shape[:-3] != key.shape[:-3] \
            or key.shape[:-2] != value.shape[:-2]:
        return 1
    return query.shape[-3]


def _groups(query: Tensor, key: Tensor, value: Tensor) -> int | None:
    """Query heads per key and value head under ``enable_gqa``, or None where torch's own
    function should decide (and explain) what to do with the shapes."""
    if query.dim() < 3 or key.shape[:-2] != value.shape[:-2] or query.shape[:-3] != key.shape[:-3]:
        return None
    heads, kv_heads = query.shape[-3], key.shape[-3]
    return heads // kv_heads if kv_heads and heads % kv_heads == 0 else None


def multi_head_attention_forward(
    query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int, num_heads: int,
    in_proj_weight: Tensor | None, in_proj_bias: Tensor | None, bias_k: Tensor | None, bias_v: Tensor | None,
    add_zero_attn: bool, dropout_p: float, out_proj_weight: Tensor, out_proj_bias: Tensor | None,
    training: bool = True, key_padding_mask: Tensor | None = None, need_weights: bool = True,
    attn_mask: Tensor | None = None, use_separate_proj_weight: bool = False, q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None, v_proj_weight: Tensor | None = None, static_k: Tensor | None = None,
    static_v: Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    config: SketchConfig = _DEFAULT,
) -> tuple[Tensor, Tensor | None]:
    """RAD ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` runs while training).

    The projections are RAD linear layers (weight gradients from sketches of
    their inputs) and the attention is :func:`scaled_dot_product_attention`;
    the output is computed as torch computes it. Runs torch's function
    unchanged (exact, saving what torch saves) when attention weights are
    requested (``need_weights=True``, the module's default: pass
    ``need_weights=False``, as ``nn.Transformer*`` layers do), with
    ``bias_k``/``bias_v``, ``add_zero_attn`` or static keys and values.
    """
    _check_config("functional.multi_head_attention_forward", config)
    args = (query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
            add_zero_attn, dropout_p, out_proj_weight, out_proj_bias)
    kwargs = dict(training=training, key_padding_mask=key_padding_mask, need_weights=need_weights,
                  attn_mask=attn_mask, use_separate_proj_weight=use_separate_proj_weight,
                  q_proj_weight=q_proj_weight, k_proj_weight=k_proj_weight, v_proj_weight=v_proj_weight,
                  static_k=static_k, static_v=static_v, average_attn_weights=average_attn_weights,
                  is_causal=is_causal)
    if (need_weights or bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None
            or static_v is not None or query.dim() not in (2, 3)):
        return F.multi_head_attention_forward(*args, **kwargs)
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    if embed_dim != embed_dim_to_check or embed_dim % num_heads:
        return F.multi_head_attention_forward(*args, **kwargs)
    head_dim = embed_dim // num_heads
    # masks exactly as torch's function prepares them
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("radgrad: need attn_mask if specifying the is_causal hint (as torch requires)")
    if is_causal and key_padding_mask is None:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if not use_separate_proj_weight:
        if key is value and query is key:
            proj = linear(query, in_proj_weight, in_proj_bias, config)
            proj = proj.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            q, k, v = proj[0], proj[1], proj[2]
        else:
            w_q, w_k, w_v = in_proj_weight.chunk(3)
            b_q, b_k, b_v = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
            q, k, v = linear(query, w_q, b_q, config), linear(key, w_k, b_k, config), linear(value, w_v, b_v, config)
    else:
        b_q, b_k, b_v = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = (linear(query, q_proj_weight, b_q, config), linear(key, k_proj_weight, b_k, config),
                   linear(value, v_proj_weight, b_v, config))
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if key_padding_mask is not None:
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                            .reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, config=config)
    out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
    out = linear(out, out_proj_weight, out_proj_bias, config).view(tgt_len, bsz, -1)
    return (out if batched else out.squeeze(1)), None
