"""Forward-pass throughput of every registered model preset on this machine's CPU.

Prints images/second for 28x28x1 (MNIST-like) and 32x32x3 (CIFAR-like) inputs at a fixed batch
size, in float32, eval mode, no gradients. Usage:

    python benchmarks/bench_models.py [--batch-size 32] [--threads 2] [--seconds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

import pixeldensity

SHAPES = {"28x28x1": (1, 28, 28), "32x32x3": (3, 32, 32)}


def images_per_second(model, images: torch.Tensor, seconds: float) -> float:
    """Runs forward passes for about `seconds` after one warm-up pass; returns images/s."""
    with torch.no_grad():
        model(images)
        start = time.perf_counter()
        passes = 0
        while time.perf_counter() - start < seconds or passes < 2:
            model(images)
            passes += 1
    return passes * len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--models", nargs="*", default=pixeldensity.list_models())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"batch {args.batch_size}, {args.threads} threads, float32, torch {torch.__version__}")
    print(f"{'model':24} {'params (C=1)':>12} " + " ".join(f"{name:>14}" for name in SHAPES))
    for name in args.models:
        row = []
        params = sum(p.numel() for p in pixeldensity.create_model(name).parameters())
        for channels, height, width in SHAPES.values():
            model = pixeldensity.create_model(name, in_channels=channels).eval()
            images = torch.randint(
                0, model.config.num_levels, (args.batch_size, channels, height, width)
            ).to(torch.uint8)
            row.append(images_per_second(model, images, args.seconds))
        print(f"{name:24} {params:>12,} " + " ".join(f"{rate:>10.1f} im/s" for rate in row))


if __name__ == "__main__":
    main()
