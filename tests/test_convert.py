import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import radgrad
from problems import RelativeAttention, UNetBlock


def _model():
    torch.manual_seed(0)  # some initialisations leave a ReLU dead for the whole batch
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2),
    )


def test_converts_in_place_keeping_parameters_and_optimizer():
    model = _model()
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert radgrad.convert(model, keep=0.2) is model
    assert [type(m).__module__ for m in model if not isinstance(m, nn.Flatten)] == ["radgrad.nn"] * 7
    assert type(model[2]) is radgrad.nn.MaxPool2d and type(model[3]) is radgrad.nn.AvgPool2d
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model.state_dict().keys() == state.keys()
    model(torch.randn(3, 1, 8, 8)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, state["0.weight"])


def test_converting_twice_is_harmless_and_updates_settings():
    model = radgrad.convert(_model(), keep=0.2)
    radgrad.convert(model, keep=0.2)
    assert model[0].sketch == radgrad.SketchConfig(0.2)
    radgrad.convert(model, keep=0.5, method="project", per_example=False)
    assert model[-1].sketch == radgrad.SketchConfig(0.5, "project", False)
    assert type(model[-1]) is radgrad.nn.Linear


def test_exclude_by_name_and_type():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.ReLU()), nn.Linear(3, 1))
    radgrad.convert(model, exclude=["1"])
    assert [type(m) for m in (model[0], model[1][0], model[1][1], model[2])] == [
        radgrad.nn.Linear, nn.Linear, nn.ReLU, radgrad.nn.Linear]
    model = radgrad.convert(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), exclude=(nn.ReLU,))
    assert type(model[1]) is nn.ReLU


class _FunctionalLinear(nn.Module):
    """A module of a model nobody converted by hand: its own F.linear call is routed."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return nn.functional.linear(x, self.weight)


def test_an_excluded_module_stays_exact_inside_a_routed_model():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    plain = radgrad.memory.measure(nn.Sequential(nn.Linear(8, 8)), x).total
    # (the wide last layer keeps the covered share of parameters above convert's warning)
    model = radgrad.convert(nn.Sequential(_FunctionalLinear(), nn.Linear(8, 8), nn.Linear(8, 64)),
                            method="quantize", exclude=["1"])
    saved = radgrad.memory.measure(model, x).by_module
    assert type(model[1]) is nn.Linear
    assert saved["0"] < plain / 4 and saved["1"] == plain  # routed and compressed; excluded and exact
    radgrad.convert(model, method="quantize")  # no longer excluded: converted
    assert type(model[1]) is radgrad.nn.Linear and radgrad.memory.measure(model, x).by_module["1"] < plain / 4


def test_a_model_of_radgrad_layers_only_is_not_routed():
    # nothing to reroute: the route would only add a Python call per torch op
    assert not hasattr(radgrad.convert(_model(), keep=0.2), "_radgrad_route")
    assert hasattr(radgrad.convert(nn.Sequential(_FunctionalLinear(), nn.Linear(8, 64)), keep=0.2), "_radgrad_route")


class _CheckpointsTwoModules(nn.Module):
    """Checkpoints a module of routed calls, and a bare function of the same calls."""

    def __init__(self, bare: bool):
        super().__init__()
        self.bare, self.inner, self.head = bare, _FunctionalLinear(), nn.Linear(8, 64)

    def forward(self, x):
        checkpoint = torch.utils.checkpoint.checkpoint
        if self.bare:
            x = checkpoint(lambda t: nn.functional.linear(t, self.inner.weight), x, use_reentrant=False)
        else:
            x = checkpoint(self.inner, x, use_reentrant=False)
        return self.head(x)


def test_a_checkpointed_module_is_routed_when_recomputed_a_bare_function_is_not():
    # NOTE [Routing recomputed layers]: a module starts the route for its recomputation; the
    # model's own code, recomputed outside any module of it, runs unrouted and torch refuses it
    x = torch.randn(16, 8)
    grads = []
    for make in (lambda: nn.Sequential(_FunctionalLinear(), nn.Linear(8, 64)), lambda: _CheckpointsTwoModules(False)):
        torch.manual_seed(0)
        model = radgrad.convert(make(), method="quantize")
        torch.manual_seed(1)
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    model = radgrad.convert(_CheckpointsTwoModules(True), method="quantize")
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different number of tensors"):
        model(x).sum().backward()


class _DepthwiseConv(nn.Conv2d):
    """A subclass computing with nn.Conv2d's code, as EfficientNet's depthwise convolution."""

    def __init__(self, channels):
        super().__init__(channels, channels, 3, padding=1, groups=channels)


class _OwnForwardLinear(nn.Linear):
    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_converts_the_model_itself_and_subclasses_that_keep_the_parents_forward():
    assert type(radgrad.convert(nn.Linear(2, 2))) is radgrad.nn.Linear
    attention = nn.MultiheadAttention(4, 2)
    radgrad.convert(attention)
    assert type(attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    pool = nn.MaxPool2d(2, return_indices=True)
    assert type(radgrad.convert(pool)) is nn.MaxPool2d

    torch.manual_seed(0)
    model = nn.Sequential(_DepthwiseConv(3), nn.Flatten(), _OwnForwardLinear(48, 2))
    plain = copy.deepcopy(model)
    weight = model[0].weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the subclass's `@` is routed: nothing to warn about
        radgrad.convert(model, method="quantize")
    conv = model[0]
    assert isinstance(conv, _DepthwiseConv) and isinstance(conv, radgrad.nn.Conv2d) and conv.weight is weight
    assert type(conv).__name__ == "_DepthwiseConv" and conv.sketch == radgrad.SketchConfig(method="quantize")
    assert type(model[2]) is _OwnForwardLinear
    report = radgrad.coverage(model)
    assert report.routed == ["2"] and report.exact == {} and report.parameter_share == 1.0
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(model(x), plain(x))  # training forward: exact
    with radgrad.memory.record(model) as converted:
        model(x).sum().backward()
    with radgrad.memory.record(plain) as exact:
        plain(x)
    assert converted.by_module["0"] < exact.by_module["0"] / 4
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(copied[0]) is type(conv) and copied[0].sketch == conv.sketch
    radgrad.convert(model, keep=0.5)
    assert type(model[0]) is type(conv) and conv.sketch == radgrad.SketchConfig(0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"exclude names 'head', which is not a module of the model"):
        radgrad.convert(_model(), exclude=["head"])
    with pytest.raises(TypeError, match="exclude takes module names"):
        radgrad.convert(_model(), exclude=[3])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        radgrad.convert(lambda x: x)
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        radgrad.convert(_model(), keep=2)


def test_lazy_modules_become_rad_layers_when_they_materialize():
    model = nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.LazyConv1d(2, 3))
    radgrad.convert(model, keep=0.3)
    assert type(model[0]) is nn.LazyLinear  # nothing to convert yet
    model(torch.randn(4, 6, 7))
    assert type(model[0]) is radgrad.nn.Linear and model[0].sketch == radgrad.SketchConfig(0.3)
    assert type(model[2]) is radgrad.nn.Conv1d and model[2].sketch == radgrad.SketchConfig(0.3)
    assert type(model[1]) is radgrad.nn.ReLU


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_zero_feature_linear_trains():
    model = radgrad.convert(nn.Sequential(nn.Linear(0, 3)), keep=0.1)
    x = torch.randn(4, 0)
    model(x).sum().backward()
    assert model[0].weight.grad.shape == (3, 0) and torch.equal(model[0].bias.grad, torch.full((3,), 4.0))


def test_coverage_lists_what_was_converted_and_left_exact():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8),
                          nn.BatchNorm1d(4), nn.Bilinear(8, 8, 8))
    with pytest.warns(UserWarning, match=r"only 16% of the model's trainable parameters .* left exact: 5 \(Bilinear\)"):
        radgrad.convert(model, method="quantize")
    report = radgrad.coverage(model)
    assert report.converted == {"1": "radgrad.nn.Linear", "2": "radgrad.nn.Activation", "3": "radgrad.nn.LayerNorm"}
    assert report.routed == ["4"]
    assert report.exact == {"5": "Bilinear: not a module type radgrad converts"}
    covered = (8 * 8 + 8) + 2 * 8 + 2 * 4  # Linear, LayerNorm, BatchNorm; the embedding is counted apart
    bilinear = 8 * 8 * 8 + 8
    assert report.parameter_share == covered / (covered + bilinear)
    text = str(report)
    assert "3 modules converted, 1 routed" in text and "left exact: 5: Bilinear" in text
    with pytest.raises(TypeError, match="radgrad.coverage: model must be an nn.Module, got str"):
        radgrad.coverage("model")
    with pytest.raises(ValueError, match="radgrad.coverage: top must be a non-negative int, got -1"):
        radgrad.coverage(model, top=-1)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_coverage_counts_a_parametrized_weight_with_its_layer():
    # weight norm keeps a layer's parameters in its parametrizations (as wav2vec2's positional
    # convolution does): they are the converted layer's, not a module left exact
    torch.manual_seed(0)
    normed = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3))
    plain = nn.Sequential(normed, nn.ReLU(), nn.Conv1d(4, 2, 1), nn.LSTM(5, 2, proj_size=1))
    model = radgrad.convert(copy.deepcopy(plain), keep=0.5)
    x = torch.randn(3, 4, 7)
    report = radgrad.coverage(model, x)
    assert report.converted == {"0": "radgrad.nn.Conv1d", "1": "radgrad.nn.ReLU", "2": "radgrad.nn.Conv1d"}
    assert report.exact == {"3": "LSTM: its settings are not supported by radgrad.nn.LSTM"}
    covered = (4 + 4 * 4 * 3 + 4) + (2 * 4 + 2)  # weight norm's magnitude and direction, bias; the 1x1 conv
    assert report.parameter_share == covered / (covered + sum(p.numel() for p in plain[3].parameters()))
    assert torch.equal(model.eval()[:3](x), plain.eval()[:3](x))


def test_prelu_is_converted_and_saves_a_mask_and_a_sketch():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 2, 1), nn.PReLU())
    model = radgrad.convert(copy.deepcopy(plain), method="quantize")
    x = torch.randn(4, 3, 10, 10)
    report = radgrad.coverage(model, x)
    assert report.converted["1"] == report.converted["3"] == "radgrad.nn.PReLU"
    assert report.exact == {} and report.parameter_share == 1.0
    assert report.saved_bytes["converted"] < 0.2 * report.saved_bytes["exact"]
    plain.eval(), model.eval()
    assert torch.equal(model(x), plain(x))


def test_einsum_is_routed():
    torch.manual_seed(0)
    plain = RelativeAttention()
    model = radgrad.convert(copy.deepcopy(plain), method="quantize")
    x = torch.randn(6, 3, 8)
    report = radgrad.coverage(model, x)
    assert report.exact == {} and report.saved_bytes["converted"] < 0.2 * report.saved_bytes["exact"]
    for training in (True, False):
        plain.train(training), model.train(training)
        assert torch.equal(model(x), plain(x))


def test_group_norms_and_transposed_convolutions_are_covered():
    torch.manual_seed(0)
    plain = UNetBlock()
    model = radgrad.convert(copy.deepcopy(plain), method="quantize")
    x = torch.randn(4, 4, 8, 8)
    state, rng = copy.deepcopy(model.state_dict()), torch.random.get_rng_state()
    report = radgrad.coverage(model, x)
    # the report's forward passes leave the running statistics and torch's generator as they were
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert report.converted == {"conv": "radgrad.nn.Conv2d", "down": "radgrad.nn.Conv2d",
                                "up": "radgrad.nn.ConvTranspose2d"}
    assert report.routed == ["norm", "out"] and report.exact == {} and report.parameter_share == 1.0
    assert report.saved_bytes["converted"] < 0.15 * report.saved_bytes["exact"]
    for training in (True, False):
        plain.train(training), model.train(training)
        assert torch.equal(model(x), plain(x))  # the forward pass, and the running statistics, are torch's
        assert torch.equal(model.out.running_mean, plain.out.running_mean)


class _Bias(nn.Module):
    """A learned offset: its addition saves nothing for backward."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return x + self.offset


class _Bilinear(nn.Module):
    """A product with a weight through an einsum of three operands, which radgrad leaves to torch: saved exactly."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x + torch.einsum("bij,jk,bkl->bil", x, self.weight, x)


class _EinsumLinear(nn.Linear):
    """A linear layer's subclass whose own forward calls nothing radgrad sketches."""

    def forward(self, x):
        return torch.einsum("...ii,oi->...o", x.diag_embed(), self.weight)


def test_coverage_with_inputs_lists_only_modules_whose_own_saves_stayed_exact():
    torch.manual_seed(0)
    model = nn.Sequential(_Bias(), _OwnForwardLinear(8, 8), _Bilinear(), _EinsumLinear(8, 8))
    radgrad.convert(model, method="quantize")
    static = radgrad.coverage(model)  # without inputs: by module type only; every call of the model's own code is routed
    assert static.exact == {} and static.routed == ["0", "1", "2", "3"] and static.parameter_share == 1.0
    report = radgrad.coverage(model, torch.randn(4, 8, 8))
    # the bias saves nothing; the linear's `@` is routed (it saves a sketch); the einsums torch runs save x exactly
    why = "its own code saved everything exactly (none of its torch calls is one radgrad sketches)"
    assert report.exact == {"2": f"_Bilinear: {why}", "3": f"_EinsumLinear: {why}"}
    assert report.routed == ["0", "1"]
    assert report.parameter_share == 1 - (8 * 8 + 8 * 8 + 8) / (8 + (8 * 8 + 8) + 8 * 8 + (8 * 8 + 8))


class _RawProjection(nn.Module):
    """Projections kept as raw parameters and applied by torch.einsum, as XLNet's attention does."""

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Parameter(torch.randn(8, 2, 4)), nn.Parameter(torch.randn(8, 2, 4))

    def forward(self, x):  # (positions, batch, features)
        return torch.einsum("ibnd,hnd->ibh", torch.einsum("ibh,hnd->ibnd", x, self.q).tanh(), self.o)


def test_a_models_own_module_with_raw_parameters_counts_as_routed():
    torch.manual_seed(0)
    model = nn.Sequential(_RawProjection(), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left exact by type: no warning
        radgrad.convert(model, method="quantize")
    static = radgrad.coverage(model)
    assert static.routed == ["0"] and static.exact == {} and static.parameter_share == 1.0
    report = radgrad.coverage(model, torch.randn(6, 3, 8))
    assert report.routed == ["0"] and report.exact == {} and report.parameter_share == 1.0
    assert report.saved_bytes["converted"] < 0.2 * report.saved_bytes["exact"]


def test_coverage_names_excluded_modules():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(_OwnForwardLinear(8, 8), nn.BatchNorm1d(8)))
    with pytest.warns(UserWarning, match=r"left exact: 1.0 \(_OwnForwardLinear"):
        radgrad.convert(model, method="quantize", exclude=["1"])
    report = radgrad.coverage(model)
    assert report.routed == [] and report.exact == {"1.0": "_OwnForwardLinear: excluded from conversion",
                                                    "1.1": "BatchNorm1d: excluded from conversion"}


def test_coverage_with_inputs_measures_saved_bytes_and_restores_settings():
    model = radgrad.convert(nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)), method="quantize").eval()
    report = radgrad.coverage(model, torch.randn(64, 32))
    exact = radgrad.memory.saved_bytes(nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)),
                                       torch.randn(64, 32))
    assert report.saved_bytes["exact"] == exact
    assert report.saved_bytes["converted"] < 0.2 * exact
    assert not model.training and model[0].sketch.method == "quantize"
    assert set(report.holders) == {"0", "1", "2"}
