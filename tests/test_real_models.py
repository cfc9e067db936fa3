"""convert() on the models people train: Hugging Face GPT-2, nn.TransformerEncoder, custom activations."""

import copy
import json
import pickle

import pytest
import torch
from torch import nn

import radgrad
from problems import QuickGELU, assert_unbiased

transformers = pytest.importorskip("transformers")
from transformers.activations import NewGELUActivation  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

transformers.logging.set_verbosity_error()
QUANTIZE = dict(method="quantize")  # the recommended setting, per-op default bits


def _gpt2(dropout: float = 0.0, attention: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout,
                                     attn_pdrop=dropout, attn_implementation=attention)
    return transformers.GPT2LMHeadModel(config)


def _eager_gpt2(dropout: float = 0.0) -> nn.Module:
    """GPT-2 whose attention is written with torch functions: matmul, softmax, dropout."""
    return _gpt2(dropout, "eager")


def _llama(dropout: float = 0.0) -> nn.Module:
    """Llama: rotary positions, RMS norms of its own, a SiLU-gated MLP, 2 key-value heads for 4 query heads."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                                      attention_dropout=dropout, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config)


def _t5(dropout: float = 0.0) -> nn.Module:
    """T5: relative position biases, learned, added to every attention's scores; an encoder and a decoder."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=dropout, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
    return _LabelsAsDecoderInput(transformers.T5ForConditionalGeneration(config))


def _bloom(dropout: float = 0.0) -> nn.Module:
    """Bloom: ALiBi position biases added to q @ k^T by torch.baddbmm, attention written with torch functions."""
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=32, hidden_size=16, n_layer=1, n_head=4, attention_dropout=dropout,
                                      hidden_dropout=dropout, use_cache=False)
    return transformers.BloomForCausalLM(config)


def _falcon(dropout: float = 0.0) -> nn.Module:
    """Falcon: one key and value head broadcast to four query heads, FalconLinear layers with their own forward."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                       attention_dropout=dropout, hidden_dropout=dropout, use_cache=False)
    return transformers.FalconForCausalLM(config)


class _LabelsAsDecoderInput(nn.Module):
    """An encoder-decoder called as the language models here: ``model(x)``, the targets shifted in."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x, decoder_input_ids=x)


def _encoder(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout, batch_first=True, activation="gelu")
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 5))


EVERY_MODEL = pytest.mark.parametrize(
    "make", [_gpt2, _eager_gpt2, _llama, _t5, _bloom, _falcon, _encoder],
    ids=["gpt2", "gpt2-eager", "llama", "t5", "bloom", "falcon", "transformer-encoder"])


def test_gpt2_converts_its_conv1d_activations_norms_and_dropout_keeping_ties():
    model = _gpt2(0.1)
    params = list(model.parameters())
    radgrad.convert(model, **QUANTIZE)
    block = model.transformer.h[0]
    assert isinstance(block.attn.c_attn, Conv1D) and isinstance(block.attn.c_attn, radgrad.nn.TransposedLinear)
    assert isinstance(block.mlp.act, NewGELUActivation) and isinstance(block.mlp.act, radgrad.nn.Activation)
    assert type(block.ln_1) is radgrad.nn.LayerNorm and type(block.attn.resid_dropout) is radgrad.nn.Dropout
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(a is b for a, b in zip(model.parameters(), params))


@EVERY_MODEL
def test_eval_outputs_bitwise_equal_after_convert(make):
    model = make(0.1).eval()
    hf = make is not _encoder
    x = torch.randint(32, (3, 8)) if hf else torch.randn(3, 8, 16)
    before = model(x).logits if hf else model(x)
    radgrad.convert(model, **QUANTIZE)
    after = model(x).logits if hf else model(x)
    assert torch.equal(before, after)


def _loss(model, x, y):
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.mark.slow
@EVERY_MODEL
def test_training_gradients_unbiased_and_outputs_exact(make):
    model = make().double().train()
    torch.manual_seed(1)
    if make is not _encoder:
        x, y = torch.randint(32, (2, 8)), torch.randint(32, (2, 8))
    else:
        x, y = torch.randn(2, 8, 16, dtype=torch.float64), torch.randint(5, (2, 8))
    exact_loss = _loss(model, x, y)
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact_loss, list(model.parameters()))])
    radgrad.convert(model, **QUANTIZE)
    assert torch.equal(_loss(model, x, y), exact_loss)  # train-mode forward unchanged
    entries = torch.randperm(exact.numel(), generator=torch.Generator().manual_seed(0))[:1500]
    samples = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(_loss(model, x, y), list(model.parameters()))])[entries]
        for _ in range(500)])
    assert_unbiased(samples, exact[entries])


def test_llama_converts_its_norms_and_gated_products():
    model = _llama().train()
    x = torch.randint(32, (2, 8))
    plain = radgrad.memory.saved_bytes(model, input_ids=x, labels=x)
    radgrad.convert(model, **QUANTIZE)
    report = radgrad.coverage(model, input_ids=x, labels=x)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, radgrad.nn.RMSNormLike) and isinstance(model.model.norm,
                                                                                   radgrad.nn.RMSNormLike)
    assert not report.exact
    assert report.saved_bytes["converted"] < 0.25 * plain  # a toy width: scales and masks weigh more


class _OwnRMSNorm(nn.Module):
    """RMS normalization as Hugging Face models write it: in float32, an epsilon attribute."""

    def __init__(self, width: int, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon, self.offset = 1e-6, offset

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight + self.offset) * h.to(x.dtype)


class _GatedMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(width, 2 * width), nn.Linear(width, 2 * width), \
            nn.Linear(2 * width, width), nn.SiLU()

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


def test_rms_norm_probe_converts_a_models_own_and_torchs():
    model = nn.Sequential(_OwnRMSNorm(6), nn.RMSNorm(6), _OwnRMSNorm(6, offset=1.0), _OwnRMSNorm(6, offset=2.0),
                          nn.LayerNorm(6))
    radgrad.convert(model, **QUANTIZE)
    assert isinstance(model[0], radgrad.nn.RMSNormLike) and isinstance(model[0], _OwnRMSNorm)
    assert model[0].weight_offset == 0.0 and model[2].weight_offset == 1.0  # Gemma's (1 + weight)
    assert type(model[1]) is radgrad.nn.RMSNorm
    assert not isinstance(model[3], radgrad.nn.RMSNormLike)  # an offset of two: no known formula
    assert "3" in radgrad.coverage(model).routed  # its products are routed: sketched, not the norm's formula
    torch.manual_seed(0)
    norms = nn.Sequential(_OwnRMSNorm(6), nn.RMSNorm(6), _OwnRMSNorm(6, offset=1.0)).double()
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(6) - 0.5 * norm.offset if hasattr(norm, "offset") else torch.rand(6) + 0.5)
    exact_model = copy.deepcopy(norms)
    radgrad.convert(norms, **QUANTIZE)
    x = (torch.randn(4, 6, dtype=torch.float64) + 1).requires_grad_()
    weights = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view(x.shape)
    assert torch.equal(norms(x), exact_model(x))  # the model's own float32 code, bit for bit

    def gradient(model):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad((model(x) * weights).sum(),
                                                                      (x, *model.parameters()))])

    samples = torch.stack([gradient(norms) for _ in range(1500)])
    # the own norm computes in float32: its exact gradient is float32's, far below the estimate's noise
    assert_unbiased(samples, gradient(exact_model))


def test_gated_products_are_routed_and_unbiased():
    torch.manual_seed(0)
    model = _GatedMLP(8).double()
    rad = radgrad.convert(copy.deepcopy(model), **QUANTIZE)
    x = torch.randn(16, 8, dtype=torch.float64)
    assert torch.equal(rad(x), model(x))
    plain, converted = radgrad.memory.saved_bytes(model, x), radgrad.memory.saved_bytes(rad, x)
    assert converted < 0.1 * plain  # 0.47 were the product left to torch, saving both factors
    weights = torch.linspace(-1, 1, 16 * 8, dtype=x.dtype).view(16, 8)
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad((model(x) * weights).sum(), model.parameters())])
    samples = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad((rad(x) * weights).sum(),
                                                                                rad.parameters())])
                           for _ in range(1500)])
    assert_unbiased(samples, exact)  # the down projection's weight gradient from the product's sketches


@pytest.mark.parametrize("options, reused", [(QUANTIZE, True), (dict(keep=0.5), False)], ids=["quantize", "sample"])
def test_the_layer_after_a_product_reads_the_products_sketches(options, reused):
    # NOTE [A product's sketches serve the next layer]: quantized, the down projection saves nothing
    rad = radgrad.convert(_GatedMLP(8), **options)
    x = torch.randn(16, 8)
    with radgrad.memory.record(rad) as rec:
        rad(x).sum()
    assert ("down" not in rec.by_module) == reused
    assert rec.by_module[""] > 0  # the product's two sketches, saved by the model's own code
    # and without saved-tensor hooks, as in training: the layer's backward node says which it read
    seen = []
    rad.down.register_forward_hook(lambda m, i, out: seen.append(type(out.grad_fn).__name__))
    rad(x).sum().backward()
    assert (seen == ["_LinearOfProductBackward"]) == reused


def test_an_activation_without_a_fused_derivative_saves_its_sketch_only():
    # its derivative comes from a throwaway autograd graph, whose saved input no hook may see
    model = radgrad.convert(nn.Sequential(nn.Linear(8, 64), nn.ReLU6()), **QUANTIZE)
    assert isinstance(model[1], radgrad.nn.Activation) and model[1].fused is None
    x = torch.randn(32, 8)
    with radgrad.memory.record(model) as rec:
        model(x)
    input_bytes = 32 * 64 * 4
    assert rec.by_module["1"] < 0.15 * input_bytes  # 2-bit codes and row ranges; it was the float input too


class _Noisy(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


def test_elementwise_probe_converts_activations_and_leaves_the_rest():
    model = nn.Sequential(nn.GELU(), nn.SiLU(), QuickGELU(), nn.Softmax(-1), _Noisy(), nn.Identity(), nn.Tanh())
    radgrad.convert(model, **QUANTIZE)
    converted = [isinstance(m, radgrad.nn.Activation) for m in model]
    assert converted == [True, True, True, False, False, False, True]
    assert isinstance(model[0], nn.GELU) and model[0].fused == "gelu"  # torch's fused kernel
    assert model[2].fused is None  # no fused kernel computes it: autograd does
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    head = nn.Sequential(*model[:3], model[6]).double()
    exact_model = nn.Sequential(nn.GELU(), nn.SiLU(), QuickGELU(), nn.Tanh())
    weights = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view(x.shape)
    (exact,) = torch.autograd.grad((exact_model(x) * weights).sum(), x)
    assert torch.equal(head(x), exact_model(x))
    samples = torch.stack([torch.autograd.grad((head(x) * weights).sum(), x)[0].reshape(-1) for _ in range(3000)])
    assert_unbiased(samples, exact.reshape(-1))


def test_converted_models_pickle_and_deepcopy():
    model = radgrad.convert(_gpt2(), **QUANTIZE)
    x = torch.randint(32, (2, 8))
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone.transformer.h[0].mlp.c_fc) is type(model.transformer.h[0].mlp.c_fc)
        assert clone.transformer.h[0].mlp.c_fc.sketch == model.transformer.h[0].mlp.c_fc.sketch
        assert torch.equal(clone.eval()(x).logits, model.eval()(x).logits)


def test_attention_calls_are_routed_only_while_training():
    model = radgrad.convert(_gpt2(0.1), **QUANTIZE)
    exact = radgrad.convert(copy.deepcopy(model), keep=1.0)
    x = torch.randint(32, (2, 8))
    rad, full = (radgrad.memory.measure(m, x).by_module["transformer.h.0.attn"] for m in (model, exact))
    # exact: q, k, v, the probabilities, the dropout mask and the dropped probabilities;
    # radgrad: exact q and k, 2-bit v, 1-bit mask
    assert rad < 0.6 * full
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, exact.eval()(x).logits)


def _eager_bert(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        attn_implementation="eager"))


def _wider_eager_gpt2(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=64, n_head=2, vocab_size=32, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation="eager"))


@pytest.mark.parametrize("make, attention", [(_wider_eager_gpt2, "transformer.h.0.attn"),
                                             (_eager_bert, "bert.encoder.layer.0.attention.self")],
                         ids=["gpt2", "bert"])
def test_attention_written_with_torch_functions_saves_sketches_only(make, attention):
    # Hugging Face's eager attention: q @ k^T, softmax, dropout, P @ v, each routed to its RAD twin
    x = torch.randint(32, (2, 64))
    model = make().train()
    rad = radgrad.convert(copy.deepcopy(model), **QUANTIZE)
    assert torch.equal(rad(x).logits, model(x).logits)  # the train-mode forward is torch's
    model = make(0.1).train()
    rad = radgrad.convert(copy.deepcopy(model), **QUANTIZE)
    plain = radgrad.memory.measure(model, x).by_module[attention]
    converted = radgrad.memory.measure(rad, x).by_module[attention]
    # exact: q, k, v, the probabilities (twice: softmax output, dropped) and a byte mask, 32-bit;
    # radgrad: 2-bit sketches of q, k, v and of the dropped probabilities, two 4-bit ones of the softmax
    # output, a 1-bit mask, and row scales
    assert converted < 0.15 * plain
    assert torch.equal(model.eval()(x).logits, rad.eval()(x).logits)


def test_the_loss_inside_the_model_saves_a_sketch_of_the_probabilities():
    # Hugging Face computes the loss in the model's forward (F.cross_entropy): its log-probabilities,
    # one per vocabulary entry and position, are a language model's largest saved tensor
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=2000, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    rad = radgrad.convert(copy.deepcopy(model), **QUANTIZE)
    x = torch.randint(2000, (2, 32))
    assert torch.equal(rad(x, labels=x).loss, model(x, labels=x).loss)
    plain, converted = (radgrad.memory.measure(m, x, labels=x).by_module[""] for m in (model, rad))
    assert converted < 0.1 * plain


class _HandWrittenAttention(nn.Module):
    """Attention as a user might write it, with tensor methods and operators only."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out((q @ k.mT / 4).softmax(-1) @ v)


def test_tensor_methods_and_operators_are_routed_too():
    model = _HandWrittenAttention()
    rad = radgrad.convert(copy.deepcopy(model), **QUANTIZE)
    x = torch.randn(4, 64, 32)
    assert torch.equal(rad(x), model(x))
    plain, converted = radgrad.memory.saved_bytes(model, x), radgrad.memory.saved_bytes(rad, x)
    assert converted < 0.15 * plain


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                       num_labels=3, downsample_in_first_stage=False)
    return transformers.ResNetForImageClassification(config)


def test_resnet_batch_norm_is_routed_running_stats_exact():
    model = _resnet().train()
    rad = radgrad.convert(copy.deepcopy(model), **QUANTIZE)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(model(x).logits, rad(x).logits)  # train-mode forward, batch statistics
    for a, b in zip(model.buffers(), rad.buffers()):
        assert torch.equal(a, b)  # running statistics updated alike
    plain, converted = radgrad.memory.saved_bytes(model, x), radgrad.memory.saved_bytes(rad, x)
    assert converted < 0.25 * plain
    assert torch.equal(model.eval()(x).logits, rad.eval()(x).logits)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    return transformers.ViTForImageClassification(config)


def test_converted_vit_traces_without_graph_breaks():
    # dynamo also traces each RAD op's backward: one it cannot trace (torch.autograd.grad in
    # attention's backward without dropout, as in ViT) broke the graph at every layer
    rad = radgrad.convert(_vit().train(), **QUANTIZE)
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(rad)(x)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


@pytest.mark.parametrize("masks", ["none", "causal", "padding"])
def test_multihead_attention_is_routed_with_torch_outputs(masks):
    model = _encoder().double()
    rad = radgrad.convert(copy.deepcopy(model), **QUANTIZE)
    x = torch.randn(3, 8, 16, dtype=torch.float64)
    kwargs = {}
    if masks == "causal":
        kwargs = dict(mask=nn.Transformer.generate_square_subsequent_mask(8, dtype=torch.float64), is_causal=True)
    elif masks == "padding":
        padding = torch.zeros(3, 8, dtype=torch.bool)
        padding[0, -3:] = True
        kwargs = dict(src_key_padding_mask=padding)
    assert torch.equal(rad[0](x, **kwargs), model[0](x, **kwargs))
    report = radgrad.coverage(rad)
    assert report.routed == ["0.layers.0.self_attn", "0.layers.1.self_attn"] and report.exact == {}
    assert report.parameter_share == 1.0
    attention = "0.layers.0.self_attn"
    plain = radgrad.memory.measure(model, x).by_module[attention]
    converted = radgrad.memory.measure(rad, x).by_module[attention]
    assert converted < 0.6 * plain  # exact q, k; sketched input, v and output-projection input


def test_real_model_runs_summarize_and_combine(tmp_path, capsys):
    from radgrad.experiments import real_models

    def run(model, method, seed, level, lr=5e-4, bits=None):
        return {"model": model, "method": method, "seed": seed, "lr": lr, "bits": bits,
                "losses": [5.0] * 10 + [level, level + 0.2] * 5, "step_seconds": [0.1] * 20}

    first = [run("gpt2", "exact", 0, 2.0), run("gpt2", "quantize", 0, 2.02)]
    second = [run("gpt2", "exact", 1, 2.1), run("gpt2", "quantize", 1, 2.1)]
    for i, runs in enumerate((first, second)):
        (tmp_path / f"{i}.json").write_text(json.dumps({"config": {}, "runs": runs}))
    md, rows = real_models.summarize(first + second, last=10)
    assert real_models.final_loss(first[0], 10) == pytest.approx(2.1)
    assert [round(r["gap"], 6) for r in rows] == [round(2.12 / 2.1 - 1, 6), 0.0]
    assert rows[0]["exact_standard_error"] == pytest.approx(0.1 * (10 / 9) ** 0.5 / 10**0.5)
    assert "| gpt2 | 2.1000 / 2.2000 | 2.1200 / 2.2000 | +1.0% / +0.0% | 1.0% |" in md
    out = tmp_path / "out"
    real_models.main(["--combine", str(tmp_path / "0.json"), str(tmp_path / "1.json"), "--final", "10",
                      "--steps", "20", "--out", str(out)])
    saved = json.loads((out / "real_models.json").read_text())
    assert len(saved["runs"]) == 4 and saved["config"]["seeds"] == [0, 1]
    assert saved["config"]["lr"] == 5e-4  # the runs' rate, not the option's default
    assert saved["config"]["bits"] is None  # radgrad's per-op defaults
    assert (out / "real_models.png").stat().st_size > 0 and "+1.0%" in (out / "real_models.md").read_text()
    (tmp_path / "2.json").write_text(json.dumps({"config": {}, "runs": [run("gpt2", "exact", 2, 2.0, lr=1e-3)]}))
    with pytest.raises(SystemExit):
        real_models.main(["--combine", str(tmp_path / "0.json"), str(tmp_path / "2.json"), "--final", "10",
                          "--out", str(out)])
    assert "different learning rates [0.0005, 0.001]" in capsys.readouterr().err
    (tmp_path / "3.json").write_text(json.dumps({"config": {}, "runs": [run("gpt2", "quantize", 3, 2.0, bits=4)]}))
    with pytest.raises(SystemExit):
        real_models.main(["--combine", str(tmp_path / "0.json"), str(tmp_path / "3.json"), "--final", "10",
                          "--out", str(out)])
    assert "different bits [4, None]" in capsys.readouterr().err


def test_a_layer_set_exact_stays_exact_inside_a_routed_model():
    # the model-wide route must not re-sketch what a layer's own exact setting computes
    model = radgrad.convert(_gpt2(), **QUANTIZE)
    x = torch.randint(32, (2, 8))
    block = "transformer.h.0"
    names = [f"{block}.mlp.c_fc", f"{block}.mlp.act", f"{block}.ln_1"]
    before = radgrad.memory.measure(model, x).by_module
    modules = dict(model.named_modules())
    for name in names:
        modules[name].sketch = radgrad.SketchConfig(1.0)
    after = radgrad.memory.measure(model, x).by_module
    plain = radgrad.memory.measure(_gpt2(), x).by_module
    for name in names:
        assert after[name] > 4 * before[name], name
        assert after[name] == plain[name], name


def _grads(model: nn.Module, x: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    (out.logits if hasattr(out, "logits") else out).square().sum().backward()
    return [p.grad for p in model.parameters()]


def _checkpointed_encoder(use_reentrant: bool) -> nn.Module:
    """_encoder() with each layer run under torch.utils.checkpoint, as a user writes it."""
    model = _encoder(0.1)
    encoder = model[0]

    def forward(src, mask=None, src_key_padding_mask=None, is_causal=None):
        for layer in encoder.layers:
            src = torch.utils.checkpoint.checkpoint(layer, src, use_reentrant=use_reentrant)
        return src

    encoder.forward = forward
    return model


@pytest.mark.parametrize("make", ["gpt2", "transformer-encoder"])
def test_checkpointed_layers_recompute_the_very_sketches_of_the_forward_pass(make):
    # a recomputed layer is routed again (NOTE [Routing recomputed layers]) and, with torch's
    # restored random state, draws what its first pass drew: gradients bitwise those of the
    # converted model without checkpointing, dropout on
    if make == "gpt2":
        plain, checkpointed = _gpt2(0.1), _gpt2(0.1)
        checkpointed.activation_checkpointing_enable()  # non-reentrant by default
        # checkpointing turns the key-value cache off; the cache's copies of the keys round
        # attention differently on some CPUs, so the reference runs without it too
        plain.config.use_cache = False
        x = torch.randint(32, (3, 8))
    else:
        plain, checkpointed = _encoder(0.1), _checkpointed_encoder(use_reentrant=False)
        x = torch.randn(3, 8, 16)
    rad = [radgrad.convert(m.train(), **QUANTIZE) for m in (plain, checkpointed)]
    expected, got = _grads(rad[0], x), _grads(rad[1], x)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert not torch.equal(_grads(rad[0], x, seed=2)[0], expected[0])  # the draws do matter


@pytest.mark.parametrize("make", ["gpt2", "transformer-encoder"])
def test_reentrant_checkpointing_is_refused_with_the_way_out(make):
    # reentrant checkpointing first runs every segment under no_grad, where radgrad draws
    # nothing: the recomputed segments would share random numbers (NOTE [Draws in recomputed layers])
    if make == "gpt2":
        model = _gpt2()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        x = torch.randint(32, (3, 8))
    else:
        # an input that needs no gradient would leave reentrant checkpointing with no graph at all
        model, x = _checkpointed_encoder(use_reentrant=True), torch.randn(3, 8, 16, requires_grad=True)
    radgrad.convert(model.train(), **QUANTIZE)
    with pytest.raises(RuntimeError, match=r"use_reentrant=False"):
        _grads(model, x)
