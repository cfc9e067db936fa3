"""Train a Hugging Face ResNet on CIFAR-10 with radgrad, in one call.

The model is built from its config (random weights, nothing downloaded).
``radgrad.convert`` turns its convolutions into radgrad layers, its ReLUs
and max pooling into exact bit-mask and offset versions, and routes its
batch norms; the forward pass and the running statistics are unchanged,
every gradient an unbiased estimate.

CIFAR-10 is read from ``../shared/data`` or ``$RADGRAD_DATA`` (see
``radgrad.experiments.data.load_cifar10``); nothing is downloaded.

Run it: ``python examples/resnet_cifar.py --steps 300`` (``--exact`` trains
without radgrad, from the same weights and batches).
"""

import argparse

import torch
import transformers

import radgrad
from radgrad.experiments.data import load_cifar10, to_tensors


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--exact", action="store_true", help="train without radgrad")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    config = transformers.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2],
                                       layer_type="basic", num_labels=10, downsample_in_first_stage=False)
    model = transformers.ResNetForImageClassification(config).train()
    if not args.exact:
        radgrad.convert(model, method="quantize")  # the one call

    images, labels, _, _ = to_tensors(load_cifar10())
    mean, std = images.mean((0, 2, 3), keepdim=True), images.std((0, 2, 3), keepdim=True)
    images = (images - mean) / std
    batches = torch.Generator().manual_seed(args.seed)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(args.steps):
        index = torch.randint(len(images), (args.batch,), generator=batches)
        loss = model(pixel_values=images[index], labels=labels[index]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    main()
