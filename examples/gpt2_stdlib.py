"""Train a Hugging Face GPT-2 on the Python standard library's source, with radgrad, in one call.

The model is built from its config (random weights, nothing downloaded) and
reads bytes: a 256-token vocabulary needs no tokenizer. ``radgrad.convert``
turns its ``Conv1D`` projections, GELU, layer norms and dropout into radgrad
layers and routes its attention; the forward pass is unchanged, every
gradient an unbiased estimate, and the bytes saved for backward drop to
about a twelfth.

Run it: ``python examples/gpt2_stdlib.py --steps 300`` (``--exact`` trains
the same model without radgrad, from the same weights and batches).
"""

import argparse

import torch
import transformers

import radgrad
from radgrad.experiments.data import byte_windows, stdlib_bytes


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.1, help="GPT-2's dropout probability")
    parser.add_argument("--exact", action="store_true", help="train without radgrad")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=256, n_positions=args.context,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=args.dropout,
                                     embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                                     use_cache=False)  # a training-time cache would hold every layer's keys
    model = transformers.GPT2LMHeadModel(config).train()
    if not args.exact:
        radgrad.convert(model, method="quantize")  # the one call

    text = stdlib_bytes()
    batches = torch.Generator().manual_seed(args.seed)
    first = byte_windows(text, args.batch, args.context, batches)
    print(radgrad.coverage(model, first) if not args.exact else "exact: plain torch")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(args.steps):
        x = first if step == 0 else byte_windows(text, args.batch, args.context, batches)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    main()
