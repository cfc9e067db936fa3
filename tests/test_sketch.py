import math
from unittest import mock

import numpy as np

import pytest
import torch

import radgrad
from radgrad import rng
from radgrad.estimators import quantize, sample
from radgrad.sketch import SketchConfig, pack, unpack
from problems import assert_unbiased

# Every estimator: the three position schemes, and quantization alone or on top of each.
SAMPLED = [SketchConfig(0.25, "sample", True), SketchConfig(0.25, "sample", False),
           SketchConfig(0.25, "norm"), SketchConfig(0.25, "project", True), SketchConfig(0.25, "project", False)]
QUANTIZED = [SketchConfig(method="quantize", bits=b) for b in radgrad.BITS] + [
    SketchConfig(0.25, "sample", True, bits=2), SketchConfig(0.25, "sample", False, bits=8),
    SketchConfig(0.25, "norm", bits=1), SketchConfig(0.25, "project", True, bits=4)]
CONFIGS = SAMPLED + QUANTIZED
POSITIONED = [c for c in CONFIGS if c.method in ("sample", "project")]  # state= reuses their draw


def _id(config: SketchConfig) -> str:
    return f"{config.method}-{'pe' if config.per_example else 'shared'}-{config.bits}bits"


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_unpack_is_unbiased(config):
    torch.manual_seed(1)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    x[0, 0] = 0  # zeros and a constant row: norm never keeps a zero, quantize stores the row exactly
    x[1] = 0.5
    # The z-test needs enough of both outcomes of every rounding: with seed 1 each entry lies at
    # least 0.02 of a step from every level (but the row's ends, which are stored exactly).
    assert _distance_to_levels(x.reshape(5, 12)) > 0.02
    # k = 3 of D = 12: one entry's sampled estimate has standard deviation sqrt(D/k - 1) |x| = 1.73 |x|,
    # so a 10% bias sits 0.1 sqrt(N) / 1.73 = 6.3 standard errors out at N = 12000 (assert_unbiased
    # checks that power on the samples themselves). Rounding alone spreads at most half a step: at
    # N = 3000 a 10% bias sits 27 standard errors out with 1 bit, more with more bits.
    draws = 3000 if config.method == "quantize" else 12000
    samples = torch.stack([unpack(pack(x, config, batch_dims=1)).reshape(-1) for _ in range(draws)])
    assert_unbiased(samples, x.reshape(-1))


def _distance_to_levels(rows: torch.Tensor) -> float:
    """Smallest distance, in steps, from an inner entry to a quantization level, over every bits."""
    lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    distance = 1.0
    for bits in radgrad.BITS:
        level = ((rows - lo) / (hi - lo) * (2**bits - 1))[(hi > lo).expand_as(rows)]
        inner = level[(level > 1e-9) & (level < 2**bits - 1 - 1e-9)]
        distance = min(distance, float((inner - inner.round()).abs().min()))
    return distance


def _expected_bytes(config: SketchConfig, rows: int, d: int, k: int) -> int:
    """Bytes a float32 sketch of rows x D stores (NOTE [What a sketch stores])."""
    n = d if config.method == "quantize" else k
    groups = -(-rows // -(-256 // n))  # rows of n < 256 entries share a scale, 256 entries per scale at least
    values = rows * -(-n * config.bits // 8) + groups * 2 * 4 if config.bits else rows * n * 4
    index = 2  # int16 positions for D <= 2**15
    state = {"sample": ((rows if config.per_example else 1) + k) * index, "norm": rows * k * index,
             "project": 8, "quantize": 0}[config.method]
    return values + state


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
@pytest.mark.parametrize("keep,d,k", [(0.1, 784, 78), (0.1, 5, 1), (0.001, 30, 1), (0.5, 9, 4)])
def test_stored_bytes_equal_the_formula(config, keep, d, k):
    if config.method != "quantize":
        config = SketchConfig(keep, config.method, config.per_example, config.bits)
    x = torch.randn(6, d)
    sketch = pack(x, config, batch_dims=1)
    assert sketch.nbytes == _expected_bytes(config, 6, d, k)
    with radgrad.memory.record() as rec:  # what autograd would keep: the same bytes
        class Keep(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                radgrad.save_for_backward(ctx, pack(t, config, batch_dims=1))
                return t.clone()

            @staticmethod
            def backward(ctx, grad):
                return grad
        Keep.apply(x.requires_grad_())
    assert rec.total == sketch.nbytes
    if config.method == "sample" and not config.bits:  # a base per row (or one shared) and k offsets
        assert 0 <= sketch.state.min() and sketch.state.max() < d
    assert unpack(sketch).shape == x.shape


@pytest.mark.parametrize("config", [SketchConfig(1.0), *CONFIGS], ids=_id)
def test_blocks_of_rows_unpack_to_the_estimate(config, monkeypatch):
    monkeypatch.setattr(radgrad.estimators.project, "_CHUNK", 20 * 5 * 2)  # projections in chunks too
    x = torch.randn(3, 7, 20, dtype=torch.float64)
    sketch = pack(x, config, batch_dims=2)
    blocks = [radgrad.sketch.unpack_rows(sketch, lo, min(21, lo + 4)) for lo in range(0, 21, 4)]
    torch.testing.assert_close(torch.cat(blocks).view(x.shape), unpack(sketch), rtol=1e-12, atol=1e-14)


def test_batch_dims_layout():
    x = torch.randn(2, 3, 4, 5)
    sketch = pack(x, SketchConfig(0.5), batch_dims=2)
    assert sketch.values.shape == (6, 10)
    assert pack(x, SketchConfig(0.5), batch_dims=0).values.shape == (1, 60)
    sketch = pack(x, SketchConfig(method="quantize", bits=4), batch_dims=2)
    assert sketch.values.shape == (6, 10) and sketch.scale.shape == (1, 2)  # short rows share a scale
    sketch = pack(torch.randn(40, 300), SketchConfig(method="quantize", bits=4), batch_dims=1)
    assert sketch.scale.shape == (40, 2)


def test_short_rows_share_scales_and_unpack_in_any_block():
    # 25 rows of 30 entries: groups of 9 rows share a scale, the last group has 7
    x = torch.randn(25, 30, dtype=torch.float64) * torch.linspace(1, 5, 25, dtype=torch.float64)[:, None]
    sketch = pack(x, SketchConfig(method="quantize", bits=2), batch_dims=1)
    assert sketch.scale.shape == (3, 2)
    whole = unpack(sketch)
    for block in (1, 4, 9, 10):
        parts = [radgrad.sketch.unpack_rows(sketch, lo, min(25, lo + block)) for lo in range(0, 25, block)]
        assert torch.equal(torch.cat(parts), whole)
    lo = sketch.scale[:, 0].repeat_interleave(9)[:25, None]
    step = sketch.scale[:, 1].repeat_interleave(9)[:25, None]
    assert torch.all((whole - lo) / step - ((whole - lo) / step).round() < 1e-9)  # on each group's grid
    assert torch.equal(sketch.scale[2, 0], x[18:].min())


def test_same_sample_shares_positions_across_rows():
    x = torch.ones(4, 50)
    est = unpack(pack(x, SketchConfig(0.1, "sample", per_example=False), batch_dims=1))
    assert (est != 0).equal((est[:1] != 0).expand_as(est))
    est = unpack(pack(x, SketchConfig(0.1, "sample", per_example=True), batch_dims=1))
    assert not (est != 0).equal((est[:1] != 0).expand_as(est))


def test_sample_keeps_exact_values_rescaled():
    x = torch.arange(1.0, 11.0).reshape(1, 10)
    sketch = pack(x, SketchConfig(0.3), batch_dims=1)
    est = unpack(sketch)
    nonzero = est != 0
    # each kept entry is x * (D/k) * (times drawn); D/k = 10/3
    ratio = est[nonzero] / x[nonzero] / (10 / 3)
    assert torch.allclose(ratio, ratio.round()) and ratio.sum() == 3


@pytest.mark.parametrize("keep", [1.0, 0.9])  # 0.9: k = round(3.6) = 4 = D, nothing to drop
def test_keeping_every_entry_stores_the_tensor_itself(keep):
    x = torch.randn(3, 4)
    for method in ("sample", "norm", "project"):
        sketch = pack(x, SketchConfig(keep, method), batch_dims=1)
        assert sketch.exact and sketch.values is x and unpack(sketch) is x
    # with bits every entry is kept, quantized: the whole row's codes
    sketch = pack(x, SketchConfig(keep, "sample", bits=4), batch_dims=1)
    assert not sketch.exact and sketch.state is None and sketch.values.shape == (3, 2)


def test_same_seed_same_estimate_bitwise_and_fresh_seeds_differ():
    x = torch.randn(8, 20)
    for config in CONFIGS:
        torch.manual_seed(3)
        a = unpack(pack(x, config, batch_dims=1))
        torch.manual_seed(3)
        b = unpack(pack(x, config, batch_dims=1))
        c = unpack(pack(x, config, batch_dims=1))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_example_projection_chunks_agree_with_one_chunk(monkeypatch):
    x = torch.randn(7, 12, dtype=torch.float64)
    config = SketchConfig(0.5, "project", True)
    one = pack(x, config, batch_dims=1)
    monkeypatch.setattr(radgrad.estimators.project, "_CHUNK", 12 * 6 * 2)  # two rows per chunk
    many = pack(x, config, batch_dims=1, state=one.state)
    torch.testing.assert_close(many.values, one.values, rtol=1e-12, atol=0)
    torch.testing.assert_close(unpack(many), unpack(one), rtol=1e-12, atol=0)


def test_generator_and_state_reuse_a_draw():
    x = torch.randn(5, 30)
    for config in CONFIGS:
        a = pack(x, config, batch_dims=1, generator=torch.Generator().manual_seed(4))
        b = pack(x, config, batch_dims=1, generator=torch.Generator().manual_seed(4))
        assert torch.equal(unpack(a), unpack(b))
    for config in SAMPLED:
        if config.method == "norm":
            continue
        a = pack(x, config, batch_dims=1)
        c = pack(2 * x, config, batch_dims=1, state=a.state)
        assert torch.equal(c.state, a.state)
        torch.testing.assert_close(unpack(c), 2 * unpack(a))


def test_state_must_fit():
    a = pack(torch.randn(5, 30), SketchConfig(0.2), batch_dims=1)
    with pytest.raises(ValueError, match=r"state must be the draw of a sketch with the same config.*"
                                         r"shape \(12,\)\), got torch.int16 of shape \(11,\)"):
        pack(torch.randn(6, 30), SketchConfig(0.2), batch_dims=1, state=a.state)
    with pytest.raises(ValueError, match=r"state must be.*shape \(\)\), got torch.int16 of shape \(11,\)"):
        pack(torch.randn(5, 30), SketchConfig(0.2, "project"), batch_dims=1, state=a.state)
    for config in (SketchConfig(0.2, "norm"), SketchConfig(method="quantize")):
        with pytest.raises(ValueError, match=r"state= gives the positions or signs of method 'sample' or "
                                             r"'project' with keep < 1; this config .* draws none ahead"):
            pack(torch.randn(5, 30), config, batch_dims=1, state=a.state)


@pytest.mark.parametrize("d,dtype", [(d, torch.int16) for d in (1, 2, 7, 784, 2**15 - 1, 2**15)]
                         + [(d, torch.int32) for d in (1, 784, 2**15, 2**15 + 1, 2**20)]
                         + [(d, torch.int64) for d in (1, 2**20)]  # a state= a user drew in other types
                         + [(d, torch.uint8) for d in (1, 200, 255)] + [(d, torch.int8) for d in (1, 127)])
def test_sample_indices_are_the_sum_mod_d(d, dtype):
    # NOTE [Sampling with shared offsets]: (a + o) mod D, computed with shifts in the state's own
    # type, at the edges of that type (int16 states are drawn for D <= 2**15, int32 above and compiled;
    # state= accepts any integer type)
    g = torch.Generator().manual_seed(d)
    bases, offsets = (torch.randint(0, d, (n,), generator=g, dtype=dtype) for n in (40, 30))
    bases[:2], offsets[:2] = torch.tensor([0, d - 1]), torch.tensor([0, d - 1])
    assert torch.equal(sample._indices(bases, offsets, d), (bases.long()[:, None] + offsets.long()) % d)


def test_sample_indices_are_uniform_and_pairwise_independent():
    # NOTE [Sampling with shared offsets]: every index uniform on [0, D), any two
    # independent. Chi-square over the D = 5 cells of single indices and the 25
    # cells of pairs (same row, and two rows), each from 20000 draws: 4 (24)
    # degrees of freedom, so a statistic above 40 (80) is beyond 12 (8) standard
    # deviations.
    d, draws = 5, 20000
    x = torch.arange(1.0, d + 1).expand(2, d)
    gen = torch.Generator().manual_seed(0)
    firsts, seconds, others = [], [], []
    for _ in range(draws):
        sketch = pack(x, SketchConfig(0.4), batch_dims=1, generator=gen)
        positions = sketch.values.long() - 1  # x[r, j] = j + 1
        firsts.append(positions[0, 0]), seconds.append(positions[0, 1]), others.append(positions[1, 0])
    first, second, other = (torch.stack(v) for v in (firsts, seconds, others))

    def chi2(cells, n_cells):
        counts = torch.bincount(cells, minlength=n_cells).double()
        expected = cells.numel() / n_cells
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi2(first, d) < 40
    assert chi2(first * d + second, d * d) < 80
    assert chi2(first * d + other, d * d) < 80
    # power: a dependent pair (the second index equal to the first) fails at once
    assert chi2(first * d + first, d * d) > 1000


def test_rank_draws_its_own_block(monkeypatch):
    states = {}
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        torch.manual_seed(0)
        states[rank] = pack(torch.randn(4, 100), SketchConfig(0.1), batch_dims=1).state
    assert not torch.equal(states[0], states[1])


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        SketchConfig(keep)


def test_bad_keep_type_method_and_per_example():
    with pytest.raises(TypeError, match="keep must be a real number"):
        SketchConfig("0.1")
    with pytest.raises(ValueError, match=r"method must be one of \['norm', 'project', 'quantize', 'sample'\], "
                                         r"got 'drop'"):
        SketchConfig(0.1, "drop")
    with pytest.raises(TypeError, match="per_example must be True or False"):
        SketchConfig(0.1, "sample", 1)
    with pytest.raises(ValueError, match="method='norm' draws positions from each row's own values; "
                                         "per_example must be True"):
        SketchConfig(0.1, "norm", False)


def test_bits_and_quantize_keep():
    assert SketchConfig(method="quantize").bits == 2 and SketchConfig(method="quantize").keep == 1.0
    assert SketchConfig().keep == 0.1 and SketchConfig().bits is None
    assert SketchConfig(bits=np.int64(4)).bits == 4
    assert not SketchConfig(1.0, bits=8).exact and SketchConfig(1.0).exact
    with pytest.raises(ValueError, match=r"method='quantize' keeps every entry, so keep must be 1 or None, "
                                         r"got 0.5; to quantize a sample, use method='sample' with bits"):
        SketchConfig(0.5, "quantize")
    with pytest.raises(ValueError, match=r"bits must be one of \(1, 2, 4, 8\) or None, got 3"):
        SketchConfig(method="quantize", bits=3)
    for bad in ("2", 2.0, True):
        with pytest.raises(TypeError, match=r"bits must be an int in \(1, 2, 4, 8\) or None"):
            SketchConfig(bits=bad)


def test_softmax_bits_default_to_4_only_where_bits_do():
    assert SketchConfig(method="quantize").softmax_bits == 4  # the per-op default
    assert SketchConfig(method="quantize", bits=2).softmax_bits == 2  # bits given: every op alike
    assert SketchConfig(method="quantize", softmax_bits=8).softmax_bits == 8
    assert SketchConfig().softmax_bits is None and SketchConfig(bits=1).softmax_bits == 1
    softmax = SketchConfig(method="quantize").for_softmax()
    assert (softmax.bits, softmax.softmax_bits, softmax.method) == (4, 4, "quantize")
    plain = SketchConfig(method="quantize", bits=2)
    assert plain.for_softmax() is plain and SketchConfig(1.0).for_softmax().exact
    with pytest.raises(ValueError, match=r"softmax_bits must be one of \(1, 2, 4, 8\) or None, got 3"):
        SketchConfig(method="quantize", softmax_bits=3)
    with pytest.raises(TypeError, match=r"softmax_bits must be an int in \(1, 2, 4, 8\) or None, got 4.0"):
        SketchConfig(method="quantize", softmax_bits=4.0)


def test_bad_tensor_and_batch_dims():
    with pytest.raises(TypeError, match="floating-point tensors, got torch.int64"):
        pack(torch.ones(3, 4, dtype=torch.long), SketchConfig(), batch_dims=1)
    with pytest.raises(ValueError, match=r"batch_dims must be an int in \[0, 2\]"):
        pack(torch.ones(3, 4), SketchConfig(), batch_dims=3)
    with pytest.raises(TypeError, match="radgrad: config must be a radgrad.SketchConfig, got float"):
        pack(torch.ones(3, 4), 0.5, batch_dims=1)
    with pytest.raises(TypeError, match=r"radgrad.unpack: sketch must be a radgrad.Sketch \(from radgrad.pack\), "
                                        "got Tensor"):
        unpack(torch.ones(3, 4))
    with pytest.raises(TypeError, match="radgrad.tie: output must be a Tensor, got list"):
        radgrad.tie([torch.ones(3)])


@pytest.mark.parametrize("keep,expected", [(np.float32(0.5), 0.5), (np.int64(1), 1.0), (torch.tensor(0.25), 0.25)])
def test_keep_takes_numpy_and_tensor_numbers(keep, expected):
    config = SketchConfig(keep)
    assert config.keep == expected and type(config.keep) is float


def test_unhashable_method_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"method must be one of \[.*'sample'\], got \['sample'\]"):
        SketchConfig(0.1, ["sample"])


@pytest.mark.parametrize("shape,batch_dims", [((0, 7), 1), ((4, 0), 1), ((3, 0, 5), 1), ((0,), 0)])
def test_zero_size_tensors(shape, batch_dims):
    x = torch.randn(shape)
    for config in CONFIGS:
        est = unpack(pack(x, config, batch_dims=batch_dims))
        assert est.shape == x.shape and not est.any()


@pytest.mark.parametrize("bits", radgrad.BITS)
@pytest.mark.parametrize("n", [1, 3, 8, 13, 64])
def test_codes_pack_and_unpack_exactly(bits, n):
    codes = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    data = quantize._pack_codes(codes, bits)
    assert data.shape == (5, quantize.packed_width(n, bits)) and data.dtype == torch.uint8
    planes = quantize._unpack_planes(data, bits)
    assert planes.shape == (5, 8 // bits, quantize.packed_width(n, bits))
    assert torch.equal(planes.reshape(5, -1)[:, :n], codes)
    if bits < 8:  # byte j holds code j of each plane, plane 0 in the low bits (NOTE [Code packing])
        width = quantize.packed_width(n, bits)
        for i, code in enumerate(codes[0].tolist()):
            plane, j = divmod(i, width)
            assert int(data[0, j]) >> (bits * plane) & (2**bits - 1) == code


@pytest.mark.parametrize("bits", radgrad.BITS)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 13])
def test_rebuilding_short_rows_reads_only_the_planes_holding_codes(bits, n):
    # rows of fewer codes than a byte holds leave whole planes of padding, which dequantize skips:
    # the estimate is still lo + code * step from every plane's codes
    x = torch.randn(600, n, dtype=torch.float64)
    codes, scale = quantize.quantize(x, bits, x, torch.Generator().manual_seed(n))
    group = quantize.group_rows(n)
    every_plane = quantize._unpack_planes(codes, bits).reshape(600, -1)[:, :n].double()
    lo, step = (scale[:, i].repeat_interleave(group)[:600, None] for i in (0, 1))
    expected = lo + every_plane * step
    assert torch.equal(quantize.dequantize(codes, scale, bits, n, torch.float64), expected)
    assert torch.equal(quantize.dequantize(codes[100:300], scale, bits, n, torch.float64, 100), expected[100:300])


@pytest.mark.parametrize("bits", radgrad.BITS)
def test_rounding_picks_a_neighbouring_level(bits):
    x = torch.randn(4, 300, dtype=torch.float64)  # rows of >= 256 entries: one scale per row
    est = unpack(pack(x, SketchConfig(method="quantize", bits=bits), batch_dims=1))
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    step = (hi - lo) / (2**bits - 1)
    level = (x - lo) / step
    got = (est - lo) / step
    torch.testing.assert_close(got, got.round(), rtol=0, atol=1e-9)
    assert ((got.round() == level.floor()) | (got.round() == level.ceil())).all()
    assert est.amin(1).ge(lo.squeeze(1) - 1e-12).all() and est.amax(1).le(hi.squeeze(1) + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantized_estimate_keeps_the_dtype_and_constant_rows(dtype):
    x = torch.randn(3, 300).to(dtype)
    x[1] = 2.5
    sketch = pack(x, SketchConfig(method="quantize", bits=2), batch_dims=1)
    est = unpack(sketch)
    assert est.dtype == dtype and sketch.scale.dtype == torch.float32
    assert torch.equal(est[1], x[1])


def test_non_finite_rows_estimate_nan():
    x = torch.randn(3, 300)
    x[0, 2], x[1, 5] = math.inf, math.nan
    est = unpack(pack(x, SketchConfig(method="quantize"), batch_dims=1))
    assert est[:2].isnan().all() and est[2].isfinite().all()
    short = torch.randn(30, 10)  # rows of 10 share a scale in groups of 26: NaN spreads to its group only
    short[0, 3] = math.nan
    est = unpack(pack(short, SketchConfig(method="quantize"), batch_dims=1))
    assert est[:26].isnan().all() and est[26:].isfinite().all()
    # norm keeps positions of a row with inf or NaN, whose values are NaN
    sketch = pack(x, SketchConfig(0.5, "norm"), batch_dims=1)
    assert sketch.values[:2].isnan().all() and sketch.values[2].isfinite().all()


def test_norm_keeps_no_zero_and_shares_a_magnitude_per_row():
    x = torch.relu(torch.randn(6, 40, dtype=torch.float64))
    x[3] = 0
    sketch = pack(x, SketchConfig(0.2, "norm"), batch_dims=1)
    est = unpack(sketch)
    assert not est[x == 0].any() and not est[3].any()
    kept = sketch.values[torch.arange(6) != 3]
    expected = (x.abs().sum(1, keepdim=True) / 8)[torch.arange(6) != 3]
    torch.testing.assert_close(kept, expected.expand_as(kept), rtol=1e-12, atol=0)


def test_uniform_grid_is_uniform_and_pairwise_independent():
    # NOTE [Pairwise-independent uniforms]: chi-square over 5 bins of one u, and
    # the 25 bins of pairs in one row and in one column, from 20000 grids.
    gen = torch.Generator().manual_seed(0)
    grids = torch.stack([rng.uniform(2, 2, torch.float64, torch.empty(0), gen) for _ in range(20000)])
    bins = (grids * 5).long()
    first, right, below = bins[:, 0, 0], bins[:, 0, 1], bins[:, 1, 0]

    def chi2(cells, n_cells):
        counts = torch.bincount(cells, minlength=n_cells).double()
        expected = cells.numel() / n_cells
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi2(first, 5) < 40 and chi2(first * 5 + right, 25) < 80 and chi2(first * 5 + below, 25) < 80
    diagonal = bins[:, 1, 1]  # u[1,1] - u[1,0] - u[0,1] + u[0,0] = 0 mod 1: triples are dependent, pairs not
    assert chi2(first * 5 + diagonal, 25) < 80
    assert chi2(first * 5 + first, 25) > 1000  # power


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rounding_is_exact_to_the_grain_of_the_dtype(dtype):
    # NOTE [Pairwise-independent uniforms]: 2**-30 above level 0 rounds up to 1 with probability
    # 2**-30, and the largest uniform of a float64 grid, 1 - 2**-52, is a draw that takes it
    # there; on a grid of 2**-23 (float32's) no draw does: a bias of 2**-30 of a step that
    # float64 tensors used to carry. Any entry further from its level, 0.5, rounds up either way.
    x = torch.tensor([[0.0, 3.0, 2.0**-30, 0.5]], dtype=dtype)  # 2 bits between 0 and 3: a code is its value
    grain = 52 if dtype == torch.float64 else 23

    def largest(low, high, shape, dtype, after, generator=None):
        assert high == 2**grain
        drawn = torch.full(shape, high - 1, dtype=dtype)
        drawn[0] = 0  # the grid's one row part; its columns all 1 - 2**-grain
        return drawn

    with mock.patch.object(rng, "draw", largest):
        estimate = unpack(pack(x, SketchConfig(method="quantize", bits=2), batch_dims=1))
    assert estimate.tolist() == [[0.0, 3.0, 1.0 if dtype == torch.float64 else 0.0, 1.0]]


@pytest.mark.parametrize("rows", [5, 128], ids=["part-of-a-group", "one-whole-group"])
def test_short_rows_sharing_a_grid_row_round_independently(rows):
    # NOTE [Stochastic rounding]: rows of 2 entries share a scale group (128 rows) and one row of
    # the grid of uniforms. 2 bits between the group's 0 and 3: the level is the value. Every pair
    # of rounding errors, in one row or across rows, must be uncorrelated, as with independent
    # rounding; a sample correlation of n independent pairs has standard error 1 / sqrt(n).
    x = torch.ones(rows, 2, dtype=torch.float64)
    x[:5] = torch.tensor([[0.0, 3.0], [0.5, 1.5], [1.25, 2.5], [2.75, 0.25], [1.5, 2.5]])
    gen, n = torch.Generator().manual_seed(0), 20000
    config = SketchConfig(method="quantize", bits=2)
    errors = torch.stack([unpack(pack(x, config, batch_dims=1, generator=gen)) - x for _ in range(n)])
    inner = errors[:, 1:5].reshape(n, 8)  # the first row holds the group's ends, stored exactly
    correlations = torch.corrcoef(inner.T) - torch.eye(8, dtype=torch.float64)
    assert correlations.abs().max() < 5 / math.sqrt(n)
    # power: one uniform per column shared by the rows correlates rows 1 and 4 (both half a step up)
    shared = torch.rand(n, 1, 2, dtype=torch.float64, generator=gen)
    dependent = (torch.floor(x[1:5] + shared) - x[1:5]).reshape(n, 8)
    assert (torch.corrcoef(dependent.T) - torch.eye(8, dtype=torch.float64)).abs().max() > 0.5


@pytest.mark.parametrize("bits", radgrad.BITS)
def test_rounding_a_block_of_rows_at_a_time_changes_nothing(bits, monkeypatch):
    x = torch.randn(7, 3, 10)
    config = SketchConfig(method="quantize", bits=bits)
    whole = pack(x, config, batch_dims=2, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(quantize, "_BLOCK", 25)  # two rows of 10 per block
    blocks = pack(x, config, batch_dims=2, generator=torch.Generator().manual_seed(2))
    assert torch.equal(blocks.values, whole.values) and torch.equal(blocks.scale, whole.scale)


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
@pytest.mark.parametrize("block", [None, 25], ids=["whole", "blocks"])
def test_copies_are_separate_packs_of_one_range(config, block, monkeypatch):
    # pack_copies computes a quantized range and scale once and draws every copy's rounding in one
    # call: the bytes are those of as many separate packs from the same generator state
    if block is not None:
        monkeypatch.setattr(quantize, "_BLOCK", block)  # rounded two rows at a time
    x = torch.randn(7, 3, 10)
    copies = radgrad.sketch.pack_copies(x, config, batch_dims=2, copies=3,
                                        generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    separate = [pack(x, config, batch_dims=2, generator=generator) for _ in range(3)]
    assert len(copies) == 3
    for got, want in zip(copies, separate):
        for part in ("values", "state", "scale"):
            a, b = getattr(got, part), getattr(want, part)
            assert (a is None and b is None) or torch.equal(a, b), part
    assert not torch.equal(copies[0].values, copies[1].values)
    if config.bits is not None:  # each copy its own scale tensor, to be returned as an output of its own
        assert copies[0].scale is not copies[1].scale


@pytest.mark.parametrize("copies", [0, -1, 1.0, True, "2"])
def test_bad_copies(copies):
    with pytest.raises(ValueError, match="copies must be a positive int, got"):
        radgrad.sketch.pack_copies(torch.randn(2, 3), SketchConfig(method="quantize"), batch_dims=1, copies=copies)
