"""What torch.compile costs on a converted model: the first compiled training steps, then the steady one.

For each model (those of bench_real_models.py and the Hugging Face families
of bench_model_families.py), plain torch and ``radgrad.convert(model,
method="quantize")`` are wrapped in ``torch.compile`` (inductor) and run:
the seconds of its first two training steps (nearly all compilation:
dynamo, AOTAutograd, inductor, the C++ compiler; Hugging Face classifiers
set ``config.problem_type`` in their first call, which compiles them
again in the second), each model compiled in a fresh, empty inductor
cache, as on a new machine; then the compiled step time,
medians of ``--rounds`` interleaved rounds, converted over plain.

With ``--inline``, a third model: converted, with radgrad's quantization
and rebuild traced inline at every call rather than once per shape as
nested compile regions (NOTE [Traced once per shape] in
radgrad.estimators.quantize), to measure what the regions change in one
process.

``--inline-only NAME`` traces only that one of the two inline (``_plane_codes``:
the quantization, ``_scaled_planes``: the rebuild), the other staying a
region, to see which of the two fusions the step time misses.

With ``--inline-regions-after-tracing``, torch's
``torch._dynamo.config.inline_invoke_subgraph`` is set: dynamo still
traces each region once, then inlines the regions into the graph it hands
on, so AOTAutograd and inductor compile (and fuse) them at every call.

    python benchmarks/bench_compile_time.py --models gpt2 vit resnet --inline --rounds 20 --out results/bench_compile_time.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.utils
import transformers
from bench_model_families import FAMILIES, build
from bench_real_models import MODELS, _model_and_loss, step_times

from radgrad.estimators import quantize
from radgrad.experiments import report

#: Whether the "inline" model is running: the quantization's two traced functions read it.
_INLINE = False
_REGIONS = {name: getattr(quantize, name) for name in ("_plane_codes", "_scaled_planes")}


def _switchable(name: str, inline_in_model: bool):
    """``name`` traced inline while the "inline" model runs (if ``inline_in_model``), else as a region."""
    region, inline = _REGIONS[name], _REGIONS[name].__wrapped__

    def call(*args):
        return inline(*args) if _INLINE and inline_in_model else region(*args)
    return call


class _Inline(torch.nn.Module):
    """Calls ``model`` (compiled) with the quantization traced inline: the switch is set outside the
    compiled code, which guards on it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        global _INLINE
        _INLINE = True
        try:
            return self.model(*args, **kwargs)
        finally:
            _INLINE = False


def _build(name: str):
    """(plain model, converted model, loss of a model on one fixed batch), seed 0."""
    if name in FAMILIES:
        plain, rad, inputs = build(name)
        return plain, rad, lambda m: m(**inputs).loss
    plain, loss = _model_and_loss(name, "exact")
    return plain, _model_and_loss(name, "quantize")[0], loss


def measure(name: str, rounds: int, inline: bool) -> dict:
    plain, rad, loss = _build(name)
    compiled = {"plain": torch.compile(plain), "radgrad": torch.compile(rad)}
    if inline:
        compiled["radgrad_inline"] = _Inline(torch.compile(copy.deepcopy(rad)))
    first = {}
    torch._dynamo.reset()
    for kind in compiled:
        with torch._inductor.utils.fresh_cache():
            start = time.perf_counter()
            for _ in range(2):
                loss(compiled[kind]).backward()
            first[kind] = time.perf_counter() - start
        print(f"{name} {kind}: first two compiled steps {first[kind]:.1f} s", flush=True)
    result = {"model": name, "first_two_steps_seconds": first}
    if rounds:
        times = {k: statistics.median(v) for k, v in step_times(compiled, loss, rounds).items()}
        result["step_seconds"] = times
        result["step_ratio"] = {k: t / times["plain"] for k, t in times.items() if k != "plain"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2", "vit", "resnet"], choices=[*MODELS, *FAMILIES])
    parser.add_argument("--inline", action="store_true",
                        help="also compile the converted model with the quantization traced inline")
    parser.add_argument("--inline-only", choices=list(_REGIONS),
                        help="with --inline, trace only this function inline; the other stays a region")
    parser.add_argument("--inline-regions-after-tracing", action="store_true",
                        help="set torch._dynamo.config.inline_invoke_subgraph")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds of compiled step timing (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.rounds < 0:
        parser.error(f"--rounds must be >= 0, got {args.rounds}")
    torch.set_num_threads(args.threads)
    torch._dynamo.config.inline_invoke_subgraph = args.inline_regions_after_tracing
    if args.inline_only and not args.inline:
        parser.error("--inline-only needs --inline")
    for name in _REGIONS:
        setattr(quantize, name, _switchable(name, args.inline_only in (None, name)))
    kinds = ["plain", "radgrad", *(["radgrad_inline"] if args.inline else [])]
    results, rows = [], []
    for name in args.models:
        r = measure(name, args.rounds, args.inline)
        results.append(r)
        ratios = r.get("step_ratio", {})
        rows.append((name, *(f"{r['first_two_steps_seconds'][k]:.0f}" for k in kinds),
                     *(f"{ratios[k]:.3f}" if k in ratios else "n/a" for k in kinds[1:])))
    print(report.markdown(("model", *(f"{k}: first two steps (s)" for k in kinds),
                           *(f"{k}: step / plain" for k in kinds[1:])), rows))
    if args.out:
        report.write_json(args.out, vars(args), {"results": results}, transformers=transformers.__version__)


if __name__ == "__main__":
    main()
