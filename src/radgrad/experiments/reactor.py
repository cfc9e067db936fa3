"""The reactor PDE of the RAD paper (section 5): a controlled heat equation, its loss and gradient.

A case study, not part of the library: it uses radgrad only through its public sketch API
(:class:`radgrad.SketchConfig`, :func:`radgrad.pack`, :func:`radgrad.save_for_backward`,
:func:`radgrad.saved_tensors`), as a user's own autograd function would. The command line
is :mod:`radgrad.experiments.reactor_cli`.

Problem (all exact, nothing here is randomized except the stored states):
    ``d phi/dt = D lap(phi) + C(x, y, t; theta) phi`` on the unit square, ``phi = 0`` on the
    boundary, ``phi(0) = sin(pi x) sin(pi y)``, with the control::

        C = t0 + t1 sin(pi t) + t2 cos(pi t) + sin(2 pi x) (t3 sin(pi t) + t4 cos(pi t))
               + cos(2 pi x) (t5 sin(pi t) + t6 cos(pi t))

NOTE [Discretisation]
    Grid nodes ``x_i = i dx``, ``i = 0..nx``, ``dx = 1/nx`` (the paper: ``nx = 32``, a
    33 x 33 grid). The unknowns are the ``(nx-1)^2`` interior nodes; arrays are indexed
    ``[x, y]``. Explicit Euler with the 5-point Laplacian and ``N = t_end/dt`` steps::

        phi_{n+1} = phi_n + dt (D lap_h phi_n + C(t_n) phi_n),   t_n = n dt,

    stable for ``dt <= dx^2 / (4 D)`` (checked). Written with ``S = I/2 + (dt D/dx^2) T``
    (``T = tridiag(1, -2, 1)``) and ``L_n = S + dt diag(c_n)`` (``C`` does not depend on y):
    ``phi_{n+1} = L_n phi_n + phi_n S``.

NOTE [Loss]
    ``loss = (1/N) sum_{n=1..N} (1/(nx-1)^2) sum_{interior (x,y)} (phi_n - phi_target(t_n))^2``
    with ``phi_target(t) = phi(0) + 0.25 sin(pi t) sin(2 pi x) sin(pi y)``: the mean over the
    ``N`` states the steps produce (``t_1 .. t_N = t_end``; ``phi_0`` is fixed) of the mean
    over the interior nodes (the boundary nodes, where both are 0, would only rescale the
    loss by ``(nx-1)^2/(nx+1)^2``).

NOTE [Adjoint]
    With ``lam_n = dL/dphi_n`` (``lam_{N+1} = 0``)::

        lam_n = (2/(N M)) (phi_n - phi_target(t_n)) + L_n lam_{n+1} + lam_{n+1} S
        dL/dtheta_j = dt sum_{n=0..N-1} < lam_{n+1}, B_j(t_n) * phi_n >

    where ``M = (nx-1)^2`` and ``B_j`` is the basis field multiplying ``theta_j`` in ``C``
    (a spatial field in {1, sin 2 pi x, cos 2 pi x} times a time function in
    {1, sin pi t, cos pi t}). The states are the only stored values.

NOTE [RAD]
    ``keep < 1`` stores, per state, ``k = max(1, round(keep M))`` of its values at fresh
    uniform positions (with replacement) through :func:`radgrad.pack`, and the backward pass
    uses the unbiased estimate ``phi~_n`` in both places ``phi_n`` appears above. ``lam_{n+1}``
    depends only on ``phi~_m`` for ``m > n``, which are independent of ``phi~_n`` and enter
    linearly, so ``E[dL/dtheta]`` is the exact gradient. The forward value of the loss is
    always exact. Checkpointing (``checkpoint_every=m``) stores ``phi_0, phi_m, phi_2m, ...``
    and recomputes each segment in the backward pass: exact, at one extra forward pass.

NOTE [Speed]
    One BLAS call per time step, forward and backward: a buffer ``R = [[L_n, X], [0, S]]``
    holds the state ``X`` at two places of one storage, so that
    ``R[:m, :] @ R[:, m:] = L_n X + X S``; its output is written straight into the state
    slot of the next step's buffer (the adjoint adds its loss source the same way, see
    :class:`_Stepper`); on the CPU the call goes through numpy views of the buffer (about a
    third of torch's per-call overhead for 31 x 62 matrices). Controls ``c_n`` (3 spatial
    fields times 3 time functions) and ``L_n`` diagonals are built for blocks of 256 steps
    at once, and ``dL/dtheta`` is accumulated per block with two matmuls. At the paper's size
    a loss+gradient takes about 1.3 s against about 60 s for the plain autograd loop
    :func:`loss_reference` (``benchmarks/bench_reactor.py``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

import radgrad

__all__ = ["initial_theta", "loss", "loss_reference", "simulate", "target", "validate"]

#: Time steps handled per block (buffers of about 32 KB per step at nx=32).
_BLOCK = 256
#: (time function, spatial field) of each theta_j; functions (1, sin pi t, cos pi t),
#: fields (1, sin 2 pi x, cos 2 pi x).
_BASIS = (torch.tensor([0, 1, 2, 1, 2, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 2, 2]))
#: Amplitude of the target's moving part.
_TARGET_AMPLITUDE = 0.25


@dataclass(frozen=True)
class _Problem:
    """A validated discretisation: ``nx`` cells per side, ``steps`` Euler steps of ``dt``."""

    nx: int
    dt: float
    steps: int
    diffusion: float

    @property
    def m(self) -> int:
        """Interior nodes per side."""
        return self.nx - 1


@dataclass(frozen=True)
class _Fields:
    """Precomputed arrays of a problem, in one dtype."""

    s: Tensor  # (m, m) the symmetric half-step matrix S
    spatial: Tensor  # (3, m) rows 1, sin 2 pi x, cos 2 pi x at interior x
    phi0: Tensor  # (m, m)
    wave: Tensor  # (m, m) sin(2 pi x) sin(pi y), the target's moving part


def _problem(nx: int, dt: float, t_end: float, diffusion: float) -> _Problem:
    if isinstance(nx, bool) or not isinstance(nx, int) or nx < 2:
        raise ValueError(f"radgrad.experiments.reactor: nx must be an integer >= 2, got {nx!r}")
    for name, value in (("dt", dt), ("t_end", t_end), ("diffusion", diffusion)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(
                f"radgrad.experiments.reactor: {name} must be a positive finite number, got {value!r}"
            )
    bound = (1.0 / nx) ** 2 / (4.0 * diffusion)
    if dt > bound:
        raise ValueError(
            f"radgrad.experiments.reactor: dt={dt!r} is unstable for explicit Euler: it must be at most "
            f"dx^2/(4*diffusion) = {bound!r} (nx={nx}, diffusion={diffusion!r})"
        )
    steps = round(t_end / dt)
    if steps < 1 or abs(steps * dt - t_end) > 1e-9 * t_end:
        raise ValueError(
            f"radgrad.experiments.reactor: t_end={t_end!r} must be a positive whole multiple of dt={dt!r}"
        )
    return _Problem(nx, float(dt), steps, float(diffusion))


def _fields(p: _Problem, like: Tensor) -> _Fields:
    """The arrays of ``p`` in the dtype and on the device of ``like``."""
    x = torch.arange(1, p.nx, dtype=torch.float64) / p.nx
    a = p.dt * p.diffusion * p.nx**2
    off = torch.full((p.m - 1,), a, dtype=torch.float64)
    s = torch.diag(torch.full((p.m,), 0.5 - 2 * a, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)
    sin_x = torch.sin(math.pi * x)
    spatial = torch.stack([torch.ones_like(x), torch.sin(2 * math.pi * x), torch.cos(2 * math.pi * x)])
    phi0 = torch.outer(sin_x, sin_x)
    wave = torch.outer(spatial[1], sin_x)
    return _Fields(*(t.to(like) for t in (s, spatial, phi0, wave)))


def _time_basis(p: _Problem, n0: int, count: int, like: Tensor) -> Tensor:
    """Rows ``(1, sin pi t_n, cos pi t_n)`` for ``n = n0 .. n0+count-1``, like ``like``."""
    return _basis_at(torch.arange(n0, n0 + count, dtype=torch.float64) * p.dt).to(like)


def _basis_at(t: Tensor) -> Tensor:
    return torch.stack([torch.ones_like(t), torch.sin(math.pi * t), torch.cos(math.pi * t)], dim=1)


def _theta_matrix(theta: Tensor) -> Tensor:
    """``Theta`` (time function x spatial field) with ``c(t_n) = basis(t_n) @ Theta @ spatial``."""
    return theta.new_zeros(3, 3).index_put(_BASIS, theta)


def _residual(states: Tensor, tb: Tensor, f: _Fields) -> Tensor:
    """``phi_n - phi_target(t_n)`` for a block of states with time basis rows ``tb``."""
    r = states - f.phi0
    return r.addcmul_(tb[:, 1, None, None], f.wave, value=-_TARGET_AMPLITUDE)


class _Stepper:
    """Runs blocks of Euler steps (forward) and adjoint steps (backward), one matmul each.

    Slot ``i`` of the buffer is ``R[i] = [[L, X_i, Q_i], [0, S, 0], [0, I, 0]]`` (``3m x 3m``):
    the forward step is ``R[i, :m, :2m] @ R[i, :2m, m:2m] = L X_i + X_i S``, the adjoint
    step ``R[i, :m, :] @ R[i, :, m:2m] = L X_i + X_i S + Q_i`` with the loss source ``Q_i``.
    On the CPU the matmuls go through numpy views of the same memory (a third of torch's
    per-call overhead at this size).
    """

    def __init__(self, p: _Problem, f: _Fields) -> None:
        m = p.m
        self.p, self.f = p, f
        self.r = f.s.new_zeros(min(_BLOCK, p.steps) + 1, 3 * m, 3 * m)
        self.r[:, :m, :m] = f.s
        self.r[:, m : 2 * m, m : 2 * m] = f.s
        self.r[:, 2 * m :, m : 2 * m] = torch.eye(m, dtype=f.s.dtype)
        self.x = self.r[:, :m, m : 2 * m]
        self.source = self.r[:, :m, 2 * m :]
        self.diag = self.r[:, :m, :m].diagonal(dim1=1, dim2=2)
        cpu = self.r.device.type == "cpu"
        arr = self.r.numpy() if cpu else self.r
        self.mm = np.matmul if cpu else torch.mm
        self.step_views = [(a[:m, : 2 * m], a[: 2 * m, m : 2 * m], a[:m, m : 2 * m]) for a in arr]
        self.adjoint_views = [(a[:m, :], a[:, m : 2 * m], a[:m, m : 2 * m]) for a in arr]

    def _set_controls(self, first: int, c: Tensor) -> None:
        """``L`` of slots ``first, first+1, ...`` becomes ``S + dt diag(c[i])``."""
        torch.add(torch.diagonal(self.f.s), c, alpha=self.p.dt, out=self.diag[first : first + len(c)])

    def forward(self, x0: Tensor, c: Tensor) -> Tensor:
        """States after ``len(c)`` steps from ``x0`` with controls ``c``; a view into the buffer."""
        count = len(c)
        self._set_controls(0, c)
        self.x[0].copy_(x0)
        mm, views = self.mm, self.step_views
        with np.errstate(all="ignore"):  # overflow gives inf, as in torch, without a warning
            for i in range(count):
                w, v, _ = views[i]
                mm(w, v, out=views[i + 1][2])
        return self.x[1 : count + 1]

    def adjoint(self, lam_next: Tensor, c: Tensor, src: Tensor) -> Tensor:
        """``lam_n`` for the ``count = len(c)`` states of a block, a view into the buffer.

        ``c[i]`` and ``src[i]`` are the control and loss source of state ``i`` of the block,
        ``lam_next`` the adjoint of the state after the block.
        """
        count = len(c)
        self._set_controls(1, c)
        self.source[1 : count + 1] = src
        self.x[count].copy_(lam_next)
        mm, views = self.mm, self.adjoint_views
        with np.errstate(all="ignore"):
            for i in range(count - 1, -1, -1):
                w, v, _ = views[i + 1]
                mm(w, v, out=views[i][2])
        return self.x[:count]


def _blocks(steps: int, segment: int) -> list[tuple[int, int]]:
    """``(n0, count)`` of the blocks of steps; no block crosses a multiple of ``segment``."""
    out = []
    for s0 in range(0, steps, segment):
        s1 = min(steps, s0 + segment)
        out += [(n0, min(s1, n0 + _BLOCK) - n0) for n0 in range(s0, s1, _BLOCK)]
    return out


def _run(
    stepper: _Stepper, theta_m: Tensor, x0: Tensor, blocks: Sequence[tuple[int, int]],
    sink: Callable[[int, Tensor], None],
) -> float:
    """Step through ``blocks`` from state ``x0``; hand each block of states to ``sink``.

    Returns the sum over the blocks' states of the squared residuals.
    """
    p, f = stepper.p, stepper.f
    total = 0.0
    x = x0
    for n0, count in blocks:
        tb = _time_basis(p, n0, count + 1, x0)
        states = stepper.forward(x, tb[:-1] @ theta_m @ f.spatial)
        total += float(_residual(states, tb[1:], f).square().sum())
        sink(n0, states)
        x = states[-1]
    return total


class _Sketched:
    """Stores every state, packed block by block (exact at keep=1)."""

    def __init__(self, config: radgrad.SketchConfig) -> None:
        self.config = config
        self.sketches: list[radgrad.Sketch] = []

    def sink(self, n0: int, states: Tensor) -> None:
        x = states.clone() if self.config.exact else states
        self.sketches.append(radgrad.pack(x, self.config, batch_dims=1))

    def segment(self, p: _Problem) -> int:
        return p.steps

    def save(self, ctx: Any, theta: Tensor) -> None:
        radgrad.save_for_backward(ctx, theta, *self.sketches)
        self.sketches = []  # from now on held only by ctx, so saved-tensor hooks govern them

    def reversed_blocks(self, ctx: Any, stepper: _Stepper, theta_m: Tensor, blocks) -> Iterator[Tensor]:
        """States ``n0 .. n0+count`` (estimates) of each block, last block first."""
        sketches = radgrad.saved_tensors(ctx, unpack=False)[1:]
        later = None
        for b in range(len(blocks) - 1, -1, -1):
            here = later if later is not None else sketches[b].unpack()
            later = sketches[b - 1].unpack() if b > 0 else stepper.f.phi0[None]
            yield torch.cat([later[-1:], here])


class _Checkpointed:
    """Stores every ``every``-th state; the backward pass recomputes the rest (exact)."""

    def __init__(self, every: int, p: _Problem, x0: Tensor) -> None:
        self.every = every
        self.points = x0.new_empty((p.steps - 1) // every + 1, *x0.shape)
        self.points[0] = x0

    def sink(self, n0: int, states: Tensor) -> None:
        end = n0 + len(states)
        if end % self.every == 0 and end // self.every < len(self.points):
            self.points[end // self.every] = states[-1]

    def segment(self, p: _Problem) -> int:
        return self.every

    def save(self, ctx: Any, theta: Tensor) -> None:
        radgrad.save_for_backward(ctx, theta, self.points)
        del self.points  # from now on held only by ctx

    def reversed_blocks(self, ctx: Any, stepper: _Stepper, theta_m: Tensor, blocks) -> Iterator[Tensor]:
        """States ``n0 .. n0+count`` of each block, last block first, recomputed per segment."""
        points = radgrad.saved_tensors(ctx)[1]
        segments = [list(seg) for _, seg in itertools.groupby(blocks, key=lambda b: b[0] // self.every)]
        for s in range(len(points) - 1, -1, -1):
            seg = segments[s]
            start = seg[0][0]
            states = points.new_empty(seg[-1][0] + seg[-1][1] - start + 1, *points.shape[1:])
            states[0] = points[s]

            def keep(n0: int, block: Tensor) -> None:
                states[n0 - start + 1 : n0 - start + 1 + len(block)] = block

            _run(stepper, theta_m, points[s], seg, keep)
            for n0, count in reversed(seg):
                yield states[n0 - start : n0 - start + count + 1]


class _ReactorLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, theta: Tensor, p: _Problem, store: _Sketched | _Checkpointed) -> Tensor:
        f = _fields(p, theta)
        stepper = _Stepper(p, f)
        blocks = _blocks(p.steps, store.segment(p))
        total = _run(stepper, _theta_matrix(theta), f.phi0, blocks, store.sink)
        store.save(ctx, theta)
        ctx.p, ctx.store, ctx.blocks = p, store, blocks
        return theta.new_tensor(total / (p.steps * p.m**2))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        p, theta = ctx.p, radgrad.saved_tensors(ctx, unpack=False)[0]
        f = _fields(p, theta)
        stepper = _Stepper(p, f)
        theta_m = _theta_matrix(theta)
        scale = 2.0 * grad_out / (p.steps * p.m**2)
        g = theta.new_zeros(3, 3)
        lam = f.phi0.new_zeros(f.phi0.shape)
        states_iter = ctx.store.reversed_blocks(ctx, stepper, theta_m, ctx.blocks)
        for (n0, count), phis in zip(reversed(ctx.blocks), states_iter):
            tb = _time_basis(p, n0, count + 1, theta)
            src = _residual(phis[1:], tb[1:], f).mul_(scale)
            lams = stepper.adjoint(lam, tb[1:] @ theta_m @ f.spatial, src)
            per_x = (lams * phis[:-1]).sum(-1)
            g += tb[:-1].t() @ (per_x @ f.spatial.t())
            lam = lams[0].clone()
        return p.dt * g[_BASIS], None, None


def _check_theta(theta: Tensor) -> None:
    if not isinstance(theta, Tensor) or theta.shape != (7,) or not theta.is_floating_point():
        got = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
        raise ValueError(
            f"radgrad.experiments.reactor: theta must be a floating-point tensor of shape (7,), got {got}"
        )


def _sketch_config(keep: float, method: str, bits: int | None) -> radgrad.SketchConfig:
    try:
        return radgrad.SketchConfig(keep, method=method, per_example=True, bits=bits)
    except (TypeError, ValueError) as err:
        raise type(err)(f"radgrad.experiments.reactor: {str(err).removeprefix('radgrad: ')}") from err


def _setup(
    keep: float, nx: int, dt: float, t_end: float, diffusion: float, method: str, checkpoint_every: int | None,
    bits: int | None = None,
) -> tuple[radgrad.SketchConfig, _Problem]:
    config = _sketch_config(keep, method, bits)
    p = _problem(nx, dt, t_end, diffusion)
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(
                "radgrad.experiments.reactor: checkpoint_every must be a positive integer, "
                f"got {checkpoint_every!r}"
            )
        if not config.exact:
            raise ValueError(
                "radgrad.experiments.reactor: checkpoint_every needs keep=1 and no bits (recomputed states are exact)"
            )
    return config, p


def validate(
    *, keep: float = 1.0, nx: int = 32, dt: float = 1 / 4096, t_end: float = 10.0,
    diffusion: float = 0.25, method: str = "sample", checkpoint_every: int | None = None, bits: int | None = None,
) -> None:
    """Raise the error :func:`loss` would raise for these options (see there); else return None."""
    _setup(keep, nx, dt, t_end, diffusion, method, checkpoint_every, bits)


def loss(
    theta: Tensor,
    *,
    keep: float = 1.0,
    nx: int = 32,
    dt: float = 1 / 4096,
    t_end: float = 10.0,
    diffusion: float = 0.25,
    method: str = "sample",
    checkpoint_every: int | None = None,
    bits: int | None = None,
) -> Tensor:
    """The reactor loss (NOTE [Loss]) of control parameters ``theta``, differentiable in ``theta``.

    Exact: the returned value (for every option), and its gradient for ``keep=1`` and for
    checkpointing. Estimated (unbiased): the gradient for ``keep < 1``, which stores a fresh
    random ``keep`` fraction of each state's interior values (NOTE [RAD]); every call draws
    new positions from torch's default generator.

    Args:
        theta: shape ``(7,)``; its dtype is the computation's dtype (float64 recommended).
        keep: fraction of each state's values stored for the backward pass, in (0, 1].
        nx: cells per side (``nx + 1`` grid nodes, ``(nx-1)^2`` unknowns).
        dt: time step; must satisfy ``dt <= (1/nx)^2 / (4 diffusion)``.
        t_end: horizon, a whole multiple of ``dt``.
        diffusion: the coefficient ``D``.
        method: the :data:`radgrad.METHODS` estimator used for ``keep < 1`` (``"quantize"``: every
            value, rounded to ``bits``; takes ``keep=1``).
        bits: store the kept values in this many bits (1, 2, 4, 8), or None for full precision.
        checkpoint_every: store only every ``m``-th state and recompute the others in the
            backward pass (exact gradient, about one extra forward pass); needs ``keep=1``.

    Raises:
        ValueError: bad ``theta`` shape, ``keep`` outside (0, 1], unstable ``dt``, ``t_end``
            not a multiple of ``dt``, or ``checkpoint_every`` invalid or combined with ``keep < 1``.
    """
    _check_theta(theta)
    config, p = _setup(keep, nx, dt, t_end, diffusion, method, checkpoint_every, bits)
    if checkpoint_every is None:
        store: _Sketched | _Checkpointed = _Sketched(config)
    else:
        store = _Checkpointed(checkpoint_every, p, _fields(p, theta).phi0)
    return _ReactorLoss.apply(theta, p, store)


def loss_reference(
    theta: Tensor, *, nx: int = 32, dt: float = 1 / 4096, t_end: float = 10.0, diffusion: float = 0.25
) -> Tensor:
    """The same loss as :func:`loss` by a plain autograd loop (one torch op per stencil term).

    Exact, slow, and stores every intermediate: the baseline for speed and correctness.
    """
    _check_theta(theta)
    p = _problem(nx, dt, t_end, diffusion)
    f = _fields(p, theta)
    tb = _time_basis(p, 0, p.steps + 1, theta)
    controls = tb @ _theta_matrix(theta) @ f.spatial
    a = p.diffusion * p.nx**2
    u, states = f.phi0, []
    for n in range(p.steps):
        q = F.pad(u, (1, 1, 1, 1))
        lap = q[:-2, 1:-1] + q[2:, 1:-1] + q[1:-1, :-2] + q[1:-1, 2:] - 4 * u
        u = u + p.dt * (a * lap + controls[n, :, None] * u)
        states.append(u)
    return _residual(torch.stack(states), tb[1:], f).square().mean()


def initial_theta(generator: torch.Generator | None = None) -> Tensor:
    """The paper's start: ``theta_i ~ U(-0.1, 0.1)``, except ``theta_0 = 4.932`` (float64)."""
    theta = torch.rand(7, generator=generator, dtype=torch.float64).mul_(0.2).sub_(0.1)
    theta[0] = 4.932
    return theta


def _pad(states: Tensor) -> Tensor:
    return F.pad(states, (1, 1, 1, 1))


def _steps_at(p: _Problem, times: Sequence[float]) -> list[int]:
    steps = [round(t / p.dt) for t in times]
    if any(not 0 <= n <= p.steps for n in steps):
        raise ValueError(f"radgrad.experiments.reactor: times must lie in [0, t_end], got {list(times)}")
    return steps


@torch.no_grad()
def simulate(
    theta: Tensor, times: Sequence[float], *, nx: int = 32, dt: float = 1 / 4096,
    t_end: float = 10.0, diffusion: float = 0.25,
) -> Tensor:
    """``phi`` on the full ``(nx+1)^2`` grid at the steps nearest to ``times`` (exact, no graph).

    Returns a tensor of shape ``(len(times), nx+1, nx+1)``.
    """
    _check_theta(theta)
    p = _problem(nx, dt, t_end, diffusion)
    f = _fields(p, theta)
    wanted = _steps_at(p, times)
    found = {0: f.phi0} if 0 in wanted else {}

    def grab(n0: int, states: Tensor) -> None:
        for n in wanted:
            if n0 < n <= n0 + len(states):
                found[n] = states[n - n0 - 1].clone()

    last = max(wanted)
    if last > 0:
        _run(_Stepper(p, f), _theta_matrix(theta), f.phi0, _blocks(last, last), grab)
    return _pad(torch.stack([found[n] for n in wanted]))


def target(times: Sequence[float], *, nx: int = 32) -> Tensor:
    """``phi_target`` on the full ``(nx+1)^2`` grid at ``times`` (float64)."""
    p = _problem(nx, 1.0 / (4 * nx * nx), 1.0 / (4 * nx * nx), 1.0)  # only nx matters here
    tb = _basis_at(torch.as_tensor(times, dtype=torch.float64))
    f = _fields(p, tb)
    return _pad(-_residual(tb.new_zeros(len(tb), p.m, p.m), tb, f))
