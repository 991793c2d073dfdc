"""End-to-end throughput of the scoring pipeline against the bare model on the same images.

Both figures are measured in one run, on the same decoded images, at the same batch size and
torch thread count:

- model: `model.bits_per_dim` on (N, C, H, W) uint8 batches already in memory, no gradients;
- pipeline: `pipelines.score.run` from the shard files to the Parquet files (read, decode,
  RunInference, compressor bits/dim, flags, write), wall clock including Beam's start-up.

The model is timed before and after the pipeline and the mean is used, because other processes
on a shared machine shift the figures by 20-30% within minutes. The ratio pipeline / model is
what the pipeline keeps of the model's speed (goal: at least 0.8). Usage:

    python benchmarks/bench_score_pipeline.py [--input "runs/shards/fashion_test-00000{0..1}.tar"]
        [--model CHECKPOINT] [--batch-size 64] [--threads 2] [BEAM OPTIONS]

Without `--model` the pretrained Fashion-MNIST model is used if present, else an untrained
"pixelcnn_small"; without `--input` (or if it matches nothing) 2,000 synthetic 28x28 images are
written to a temporary shard.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pixeldensity
from pipelines import score
from pixeldensity.decoding import decode_image
from transforms.shards import match_shards, read_shard
from transforms.types import Sample

PRETRAINED = Path(__file__).parents[1] / "pixeldensity" / "pretrained" / "fashion_mnist_pixelcnn"
DEFAULT_INPUT = str(Path(__file__).parents[1] / "runs" / "shards" / "fashion_test-00000{0..1}.tar")


def synthetic_shard(directory: Path, num_images: int) -> str:
    """Writes `num_images` random 28x28 grey PNG samples to one shard; returns its path."""
    from PIL import Image

    rng = np.random.default_rng(0)
    path = directory / "synthetic-000000.tar"
    with tarfile.open(path, "w") as archive:
        for index in range(num_images):
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            pixels[:, :6] = 0
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            info = tarfile.TarInfo(f"{index:06d}.png")
            info.size = buffer.tell()
            archive.addfile(info, io.BytesIO(buffer.getvalue()))
    return str(path)


def decoded_images(pattern: str, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Decodes every image of the shards the way the pipeline does; returns (N, C, H, W) uint8."""
    channels, height, width = image_shape
    images = []
    for path in match_shards(pattern):
        for sample in read_shard(path):
            if isinstance(sample, Sample) and "png" in sample.members:
                decoded = decode_image(
                    sample.members["png"], channels=channels, size=(height, width)
                )
                images.append(decoded.image)
    return np.stack(images)


def model_images_per_second(model, images: np.ndarray, batch_size: int) -> float:
    """Times `bits_per_dim` over all images in batches of `batch_size` after one warm-up batch."""
    tensor = torch.from_numpy(images)
    with torch.inference_mode():
        model.bits_per_dim(tensor[:batch_size])
        start = time.perf_counter()
        for first in range(0, len(tensor), batch_size):
            model.bits_per_dim(tensor[first : first + batch_size])
    return len(tensor) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Parses the arguments and runs the measurement in a temporary directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=DEFAULT_INPUT)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-synthetic", type=int, default=2000)
    args, beam_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        measure(args, beam_args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(args: argparse.Namespace, beam_args: list[str], workdir: Path) -> None:
    """Times the model and the pipeline on the same images and prints the figures."""
    model_path = args.model
    if model_path is None and (PRETRAINED / "config.json").is_file():
        model_path = str(PRETRAINED)
    if model_path is None:
        model_path = str(workdir / "checkpoint")
        untrained = pixeldensity.create_model("pixelcnn_small")
        pixeldensity.save_checkpoint(model_path, untrained, image_shape=(1, 28, 28))
    checkpoint = pixeldensity.load_checkpoint(model_path)
    pattern = args.input
    try:
        match_shards(pattern)
    except ValueError:
        pattern = synthetic_shard(workdir, args.num_synthetic)

    images = decoded_images(pattern, checkpoint.image_shape)
    print(f"model {checkpoint.model_id}, {len(images)} images {checkpoint.image_shape}")
    print(f"batch {args.batch_size}, {args.threads} torch threads, torch {torch.__version__}")

    model_before = model_images_per_second(checkpoint.model, images, args.batch_size)
    argv_score = ["--input", pattern, "--model", model_path, "--output", str(workdir / "scores")]
    argv_score += ["--batch-size", str(args.batch_size), "--device", "cpu", *beam_args]
    start = time.perf_counter()
    summary = score.run(argv_score)
    pipeline_seconds = time.perf_counter() - start
    model_after = model_images_per_second(checkpoint.model, images, args.batch_size)

    model_rate = (model_before + model_after) / 2
    pipeline_rate = summary.rows / pipeline_seconds
    print(
        f"model     {model_rate:8.1f} images/s (before {model_before:.1f}, after {model_after:.1f})"
    )
    print(
        f"pipeline  {pipeline_rate:8.1f} images/s ({summary.rows} rows in {pipeline_seconds:.1f} s)"
    )
    print(f"ratio     {pipeline_rate / model_rate:8.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
