"""radgrad.convert(model, method="quantize") on Hugging Face model families nobody wrote radgrad for.

Each family's model is built from its config with random weights at one
small, common size (language models: 4 layers, 256 wide, vocabulary 256,
batch 8 x 256 random tokens; image models: batch 16 of random 64 px images,
the family's own small layout; audio classifiers: batch 4 of one second of
random 16 kHz audio; Whisper: 30 s of random log-mel features and 64 target
tokens), trained-mode forward with a loss, once
plain and once converted. Reported: the bytes saved for backward
(radgrad.memory.measure) and the peak of a forward and backward pass above
the weights (radgrad.memory.peak), converted over plain; the modules
radgrad.coverage, given the batch, finds left exact; and the module types holding most of what is
still saved. Random inputs stand in for data: no byte count depends on the
values (quantized sketches and masks have fixed sizes). With ``--rounds``,
also the eager step time (forward and backward), converted over plain,
medians of that many interleaved rounds.

A Hugging Face language model keeps a key-value cache in training too,
unless called with ``use_cache=False``: the cache holds every layer's keys
and values until the forward pass returns, whatever radgrad saves in their
place. For models that take ``use_cache``, the peak is also measured with
it off (both models alike).

    python benchmarks/bench_model_families.py --rounds 10 --out results/bench_model_families.json

With ``--compile-check BACKEND``, instead: each family, plain and converted,
wrapped in ``torch.compile(backend=BACKEND)`` and run for two training steps
(forward with its loss, backward): whether it compiles, its graph breaks
(dynamo's count and reasons) and graphs, and the seconds of those two
steps, nearly all of them compilation.

    python benchmarks/bench_model_families.py --compile-check aot_eager --out results/bench_model_families_compile.json
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo
import transformers
from bench_real_models import memory_result, peak, saved, step_times
from torch import nn
from torch._dynamo.utils import counters

import radgrad
from radgrad.experiments import report

transformers.logging.set_verbosity_error()
T = transformers
BATCH, LENGTH, VOCABULARY, PIXELS, IMAGES = 8, 256, 256, 64, 16
_LM = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=VOCABULARY)
_ENCODER = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                vocab_size=VOCABULARY)
_VIT = dict(image_size=PIXELS, patch_size=8, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=4, num_labels=10)


def _language(config: Callable, model: Callable, **options) -> Callable[[], tuple[nn.Module, dict]]:
    def build():
        ids = torch.randint(VOCABULARY, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
        return model(config(**options)), dict(input_ids=ids, labels=ids)
    return build


def _image(config: Callable, model: Callable, **options) -> Callable[[], tuple[nn.Module, dict]]:
    def build():
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(IMAGES, 3, PIXELS, PIXELS, generator=g), torch.randint(10, (IMAGES,), generator=g)
        return model(config(num_labels=10, **options)), dict(pixel_values=x, labels=y)
    return build


def _audio(config: Callable, model: Callable, **options) -> Callable[[], tuple[nn.Module, dict]]:
    """A classifier of one second of random 16 kHz audio per example (batch 4, two classes)."""
    def build():
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(4, 16000, generator=g), torch.randint(2, (4,), generator=g)
        return model(config(num_labels=2, **options)), dict(input_values=x, labels=y)
    return build


def _whisper() -> tuple[nn.Module, dict]:
    """Speech to text: 30 s of random 80-bin log-mel features (1500 encoder positions), 64 target tokens."""
    config = T.WhisperConfig(d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                             vocab_size=VOCABULARY, pad_token_id=0, decoder_start_token_id=1)
    g = torch.Generator().manual_seed(0)
    features, ids = torch.randn(2, 80, 3000, generator=g), torch.randint(2, VOCABULARY, (2, 64), generator=g)
    return T.WhisperForConditionalGeneration(config), dict(input_features=features, labels=ids)


_AUDIO = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, conv_dim=(128,) * 7)
_SEQ2SEQ = dict(d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=1024, decoder_ffn_dim=1024, vocab_size=VOCABULARY, max_position_embeddings=LENGTH)

FAMILIES: dict[str, Callable[[], tuple[nn.Module, dict]]] = {
    "mistral": _language(T.MistralConfig, T.MistralForCausalLM, num_key_value_heads=2, **_LM),
    "qwen2": _language(T.Qwen2Config, T.Qwen2ForCausalLM, num_key_value_heads=2, **_LM),
    "gemma": _language(T.GemmaConfig, T.GemmaForCausalLM, num_key_value_heads=2, head_dim=64, **_LM),
    "phi3": _language(T.Phi3Config, T.Phi3ForCausalLM, pad_token_id=0, bos_token_id=0, eos_token_id=0, **_LM),
    "phi": _language(T.PhiConfig, T.PhiForCausalLM, **_LM),
    "gpt-neox": _language(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, **_LM),
    "opt": _language(T.OPTConfig, T.OPTForCausalLM, hidden_size=256, ffn_dim=1024, num_hidden_layers=4,
                     num_attention_heads=4, vocab_size=VOCABULARY, word_embed_proj_dim=256),
    "t5": _language(T.T5Config, T.T5ForConditionalGeneration, d_model=256, d_ff=1024, num_layers=4, num_heads=4,
                    d_kv=64, vocab_size=VOCABULARY, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    "distilbert": _language(T.DistilBertConfig, T.DistilBertForMaskedLM, dim=256, hidden_dim=1024, n_layers=4,
                            n_heads=4, vocab_size=VOCABULARY),
    "roberta": _language(T.RobertaConfig, T.RobertaForMaskedLM, max_position_embeddings=LENGTH + 2, **_ENCODER),
    "electra": _language(T.ElectraConfig, T.ElectraForMaskedLM, embedding_size=128, **_ENCODER),
    "falcon": _language(T.FalconConfig, T.FalconForCausalLM, hidden_size=256, num_hidden_layers=4,
                        num_attention_heads=4, vocab_size=VOCABULARY),
    "bloom": _language(T.BloomConfig, T.BloomForCausalLM, hidden_size=256, n_layer=4, n_head=4,
                       vocab_size=VOCABULARY),
    "deit": _image(T.DeiTConfig, T.DeiTForImageClassification, **{k: v for k, v in _VIT.items() if k != "num_labels"}),
    "dinov2": _image(T.Dinov2Config, T.Dinov2ForImageClassification,
                     **{k: v for k, v in _VIT.items() if k not in ("num_labels", "intermediate_size")}),
    "swin": _image(T.SwinConfig, T.SwinForImageClassification, image_size=PIXELS, patch_size=4, embed_dim=64,
                   depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=4),
    "convnext": _image(T.ConvNextConfig, T.ConvNextForImageClassification, hidden_sizes=[64, 128, 256, 512],
                       depths=[2, 2, 2, 2]),
    "efficientnet": _image(T.EfficientNetConfig, T.EfficientNetForImageClassification, image_size=PIXELS),
    "mobilenet-v2": _image(T.MobileNetV2Config, T.MobileNetV2ForImageClassification, image_size=PIXELS),
    "regnet": _image(T.RegNetConfig, T.RegNetForImageClassification),
    # the families below were added later (commands and figures in BENCHMARKS.md)
    "whisper": _whisper,
    "wav2vec2": _audio(T.Wav2Vec2Config, T.Wav2Vec2ForSequenceClassification, **_AUDIO),
    "hubert": _audio(T.HubertConfig, T.HubertForSequenceClassification, **_AUDIO),
    "bart": _language(T.BartConfig, T.BartForConditionalGeneration, **_SEQ2SEQ),
    # transformers' reference selective scan, a Python loop over the tokens: 2 layers, 128 wide
    "mamba": _language(T.MambaConfig, T.MambaForCausalLM, hidden_size=128, num_hidden_layers=2,
                       vocab_size=VOCABULARY, state_size=16),
    "clip": _image(T.CLIPConfig, T.CLIPForImageClassification, vision_config=dict(
        image_size=PIXELS, patch_size=8, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4)),
    "segformer": _image(T.SegformerConfig, T.SegformerForImageClassification),
    "levit": _image(T.LevitConfig, T.LevitForImageClassification, image_size=PIXELS),
    "mobilevit": _image(T.MobileViTConfig, T.MobileViTForImageClassification, image_size=PIXELS),
    "poolformer": _image(T.PoolFormerConfig, T.PoolFormerForImageClassification),
    # relative attention written with torch.einsum
    "xlnet": _language(T.XLNetConfig, T.XLNetLMHeadModel, d_model=256, n_layer=4, n_head=4, d_inner=1024,
                       vocab_size=VOCABULARY),
    # local and transient-global attention written with einsums over an ellipsis
    "longt5": _language(T.LongT5Config, T.LongT5ForConditionalGeneration, d_model=256, d_ff=1024, num_layers=4,
                        num_heads=4, d_kv=64, vocab_size=VOCABULARY, decoder_start_token_id=0, pad_token_id=0,
                        eos_token_id=1, encoder_attention_type="transient-global", local_radius=32,
                        global_block_size=16),
    "funnel": _language(T.FunnelConfig, T.FunnelForMaskedLM, d_model=256, n_head=4, d_head=64, d_inner=1024,
                        block_sizes=[2, 2], vocab_size=VOCABULARY),
}


def build(name: str) -> tuple[nn.Module, nn.Module, dict]:
    """The family's model in training mode (seed 0), a converted copy (``method="quantize"``) and its inputs."""
    torch.manual_seed(0)
    plain, inputs = FAMILIES[name]()
    plain.train()
    return plain, radgrad.convert(copy.deepcopy(plain), method="quantize"), inputs


def measure(name: str, rounds: int = 0) -> dict:
    plain, rad, inputs = build(name)

    def loss(model):
        return model(**inputs).loss

    models = {"plain": plain, "radgrad": rad}
    records = {k: saved(m, loss) for k, m in models.items()}
    peaks = {k: peak(m, loss) for k, m in models.items()}
    off = None
    if "use_cache" in inspect.signature(plain.forward).parameters:
        off = {k: peak(m, lambda model: model(**inputs, use_cache=False).loss) for k, m in models.items()}
    ratio = None
    if rounds:
        times = step_times(models, loss, rounds)
        ratio = statistics.median(times["radgrad"]) / statistics.median(times["plain"])
    left = Counter(why.split(":")[0].split(",")[0] for why in radgrad.coverage(rad, **inputs).exact.values())
    return {**memory_result(name, rad, records, peaks), "model_class": type(plain).__name__,
            "left_exact": dict(left), "peak_bytes_without_cache": off,
            "peak_ratio_without_cache": off and off["radgrad"] / off["plain"], "step_ratio": ratio}


def compile_check(name: str, backend: str) -> dict:
    """Two compiled training steps of the family, plain and converted: compiled or the error,
    graph breaks, graphs, seconds."""
    plain, rad, inputs = build(name)
    result = {"family": name, "model_class": type(plain).__name__}
    for kind, model in (("plain", plain), ("radgrad", rad)):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=backend)
        start = time.perf_counter()
        try:
            for _ in range(2):
                compiled(**inputs).loss.backward()
        except Exception as e:  # recorded: what fails to compile is the finding
            result[kind] = {"compiled": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            continue
        result[kind] = {"compiled": True, "seconds": time.perf_counter() - start,
                        "graph_breaks": sum(counters["graph_break"].values()),
                        "break_reasons": list(counters["graph_break"])[:8],
                        "graphs": counters["stats"]["unique_graphs"]}
    return result


def _compile_main(args: argparse.Namespace) -> None:
    results, rows = [], []
    for name in args.families:
        r = compile_check(name, args.compile_check)
        results.append(r)
        cells = []
        for kind in ("plain", "radgrad"):
            k = r[kind]
            cells += ([f"{k['seconds']:.0f}", str(k["graph_breaks"])] if k["compiled"] else ["fails", k["error"][:80]])
        rows.append((name, *cells))
        print(name, *cells, flush=True)
    print(report.markdown(("family", "plain: seconds", "plain: graph breaks", "radgrad: seconds",
                           "radgrad: graph breaks"), rows))
    if args.out:
        report.write_json(args.out, vars(args), {"results": results}, transformers=transformers.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds of eager step timing (0: none)")
    parser.add_argument("--compile-check", metavar="BACKEND",
                        help="instead: compile each family with this torch.compile backend (see above)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compile_check:
        return _compile_main(args)
    results, rows = [], []
    for name in args.families:
        r = measure(name, args.rounds)
        results.append(r)
        left = ", ".join(f"{k} x{n}" for k, n in r["left_exact"].items()) or "none"
        holders = ", ".join(f"{k} {v:.0%}" for k, v in r["remaining_holders"].items())
        no_cache = "" if r["peak_ratio_without_cache"] is None else f"{r['peak_ratio_without_cache']:.3f}"
        step = "" if r["step_ratio"] is None else f"{r['step_ratio']:.2f}"
        rows.append((name, r["model_class"], f"{r['saved_ratio']:.3f}", f"{r['peak_ratio']:.3f}", no_cache, step,
                     left, holders))
        print(f"{name}: saved {r['saved_ratio']:.3f}, peak {r['peak_ratio']:.3f}, without cache {no_cache}, "
              f"step {step}", flush=True)
    print(report.markdown(("family", "model", "saved ratio", "peak ratio", "peak ratio, use_cache=False",
                           "eager step ratio", "modules left exact (coverage)", "what holds the remaining saved bytes"),
                          rows))
    if args.out:
        report.write_json(args.out, vars(args), {"results": results}, transformers=transformers.__version__)


if __name__ == "__main__":
    main()
