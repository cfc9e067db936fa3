"""A custom RAD op: batched matmul ``y = a @ b`` with a sketched ``a``.

``dL/db = a^T @ dL/dy`` is linear in ``a``, so the op may keep only a sketch
of ``a`` for the backward pass and still return an unbiased ``dL/db``;
``dL/da = dL/dy @ b^T`` needs only ``b`` and stays exact. Everything random
(the draw, sampling, rescaling) comes from :func:`radgrad.pack`; the kept
values go through ``ctx.save_for_backward`` via :func:`radgrad.save_for_backward`,
so :mod:`radgrad.memory` sees them. :func:`radgrad.tie` makes the output
depend on the draw, which keeps ``torch.compile`` from drawing again in the
backward pass. At ``keep=1`` the op is exact.

Run it: ``python examples/custom_op.py``.
"""

import torch

import radgrad


class SketchedBmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, config):
        # Keep only what the needed gradients read. Rows of the sketch: every
        # (batch, row of a) pair; its entries: a's last dimension.
        need_a, need_b = ctx.needs_input_grad[:2]
        sketch = radgrad.pack(a, config, batch_dims=2) if need_b else None
        radgrad.save_for_backward(ctx, sketch, b if need_a else None)
        return radgrad.tie(torch.bmm(a, b), sketch)

    @staticmethod
    def backward(ctx, grad):
        a_estimate, b = radgrad.saved_tensors(ctx)
        grad_a = grad.bmm(b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_b = a_estimate.transpose(1, 2).bmm(grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


def sketched_bmm(a: torch.Tensor, b: torch.Tensor, keep: float | None = 0.1, method: str = "sample",
                 bits: int | None = None) -> torch.Tensor:
    """``torch.bmm(a, b)`` whose gradient with respect to ``b`` is an unbiased estimate
    (``keep``, ``method``, ``bits``: see :class:`radgrad.SketchConfig`)."""
    return SketchedBmm.apply(a, b, radgrad.SketchConfig(keep, method, bits=bits))


if __name__ == "__main__":
    torch.manual_seed(0)
    a, b = torch.randn(8, 150, 512), torch.randn(8, 512, 64, requires_grad=True)
    with radgrad.memory.record() as exact:
        y = torch.bmm(a, b)
    with radgrad.memory.record() as sampled:
        y = sketched_bmm(a, b, keep=0.1)
    y.square().sum().backward()
    with radgrad.memory.record() as quantized:
        y = sketched_bmm(a, b, keep=None, method="quantize")
    y.square().sum().backward()
    print(f"saved for backward: exact {exact.total:,} B, sampled (keep 0.1) {sampled.total:,} B, "
          f"quantized (2 bits) {quantized.total:,} B")
