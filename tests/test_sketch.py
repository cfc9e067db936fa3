import math

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
def test_stores_k_values_per_row_and_a_seed(method, per_example, keep, d, k):
    x = torch.randn(6, d)
    sketch = pack(x, SketchConfig(keep, method, per_example), batch_dims=1)
    assert sketch.values.shape == (6, k)
    assert isinstance(sketch.seed, int)
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


def test_keep_one_stores_the_tensor_itself():
    x = torch.randn(3, 4)
    for method in radgrad.METHODS:
        sketch = pack(x, SketchConfig(1.0, method), batch_dims=1)
        assert sketch.values is x and sketch.seed is None and unpack(sketch) is x


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
    one = pack(x, config, batch_dims=1, seed=11)
    monkeypatch.setattr(radgrad.sketch, "_PROJECT_CHUNK", 12 * 6 * 2)  # two rows per chunk
    many = pack(x, config, batch_dims=1, seed=11)
    torch.testing.assert_close(many.values, one.values, rtol=1e-12, atol=0)
    torch.testing.assert_close(unpack(many), unpack(one), rtol=1e-12, atol=0)


def test_rank_enters_the_seed(monkeypatch):
    seeds = {}
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        torch.manual_seed(0)
        seeds[rank] = radgrad.sketch.draw_seed("cpu")
    # the CPU generator reads only the low 32 bits of a seed
    assert seeds[0] % 2**32 != seeds[1] % 2**32


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
    with pytest.raises(ValueError, match=r"batch_dims must be in \[0, 2\]"):
        pack(torch.ones(3, 4), SketchConfig(), batch_dims=3)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        pack(torch.ones(3, 4), SketchConfig(), batch_dims=1, seed=seed)
