import math

import numpy as np

import pytest
import torch

import radgrad
from radgrad.sketch import SketchConfig, pack, unpack
from problems import assert_unbiased

CONFIGS = [(m, pe) for m in radgrad.METHODS for pe in (True, False)]


@pytest.mark.parametrize("method,per_example", CONFIGS)
def test_unpack_is_unbiased(method, per_example):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    config = SketchConfig(0.25, method, per_example)
    # k = 1 of D = 4: one entry's estimate has standard deviation sqrt(D/k - 1) |x| = 1.73 |x|,
    # so a 10% bias sits 0.1 sqrt(N) / 1.73 = 6.3 standard errors out at N = 12000.
    samples = torch.stack([unpack(pack(x, config, batch_dims=1)).reshape(-1) for _ in range(12000)])
    assert_unbiased(samples, x.reshape(-1))


@pytest.mark.parametrize("method,per_example", CONFIGS)
@pytest.mark.parametrize("keep,d,k", [(0.1, 784, 78), (0.1, 5, 1), (0.001, 30, 1), (0.5, 9, 4)])
def test_stores_k_values_per_row_and_a_small_draw(method, per_example, keep, d, k):
    x = torch.randn(6, d)
    sketch = pack(x, SketchConfig(keep, method, per_example), batch_dims=1)
    assert sketch.values.shape == (6, k)
    if method == "sample":  # a base per row (or one shared) and k offsets, small integers
        assert sketch.state.shape == ((6 if per_example else 1) + k,)
        assert sketch.state.dtype == torch.int16
        assert 0 <= sketch.state.min() and sketch.state.max() < d
    else:  # one 64-bit seed
        assert sketch.state.shape == () and sketch.state.dtype == torch.int64
    assert unpack(sketch).shape == x.shape


def test_batch_dims_layout():
    x = torch.randn(2, 3, 4, 5)
    sketch = pack(x, SketchConfig(0.5), batch_dims=2)
    assert sketch.values.shape == (6, 10)
    assert pack(x, SketchConfig(0.5), batch_dims=0).values.shape == (1, 60)


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
    for method in radgrad.METHODS:
        sketch = pack(x, SketchConfig(keep, method), batch_dims=1)
        assert sketch.values is x and sketch.state is None and unpack(sketch) is x


def test_same_seed_same_estimate_bitwise_and_fresh_seeds_differ():
    x = torch.randn(8, 20)
    for method, per_example in CONFIGS:
        config = SketchConfig(0.2, method, per_example)
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
    monkeypatch.setattr(radgrad.sketch, "_PROJECT_CHUNK", 12 * 6 * 2)  # two rows per chunk
    many = pack(x, config, batch_dims=1, state=one.state)
    torch.testing.assert_close(many.values, one.values, rtol=1e-12, atol=0)
    torch.testing.assert_close(unpack(many), unpack(one), rtol=1e-12, atol=0)


def test_generator_and_state_reuse_a_draw():
    x = torch.randn(5, 30)
    for method, per_example in CONFIGS:
        config = SketchConfig(0.2, method, per_example)
        a = pack(x, config, batch_dims=1, generator=torch.Generator().manual_seed(4))
        b = pack(x, config, batch_dims=1, generator=torch.Generator().manual_seed(4))
        assert torch.equal(unpack(a), unpack(b))
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
    with pytest.raises(ValueError, match=r"method must be one of \['project', 'sample'\], got 'drop'"):
        SketchConfig(0.1, "drop")
    with pytest.raises(TypeError, match="per_example must be True or False"):
        SketchConfig(0.1, "sample", 1)


def test_bad_tensor_and_batch_dims():
    with pytest.raises(TypeError, match="floating-point tensors, got torch.int64"):
        pack(torch.ones(3, 4, dtype=torch.long), SketchConfig(), batch_dims=1)
    with pytest.raises(ValueError, match=r"batch_dims must be an int in \[0, 2\]"):
        pack(torch.ones(3, 4), SketchConfig(), batch_dims=3)


@pytest.mark.parametrize("keep,expected", [(np.float32(0.5), 0.5), (np.int64(1), 1.0), (torch.tensor(0.25), 0.25)])
def test_keep_takes_numpy_and_tensor_numbers(keep, expected):
    config = SketchConfig(keep)
    assert config.keep == expected and type(config.keep) is float


def test_unhashable_method_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"method must be one of \['project', 'sample'\], got \['sample'\]"):
        SketchConfig(0.1, ["sample"])


@pytest.mark.parametrize("shape,batch_dims", [((0, 7), 1), ((4, 0), 1), ((3, 0, 5), 1), ((0,), 0)])
def test_zero_size_tensors(shape, batch_dims):
    x = torch.randn(shape)
    for method, per_example in CONFIGS:
        est = unpack(pack(x, SketchConfig(0.3, method, per_example), batch_dims=batch_dims))
        assert est.shape == x.shape and not est.any()
