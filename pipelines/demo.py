"""The main job on real data in one command: `python -m pipelines.demo` (`make demo`).

Builds WebDataset shards from the small real samples in `pipelines/demo_data/` (Fashion-MNIST,
which the default model was trained on; MNIST digits and CIFAR-10 photographs, which it was not;
a handful of blank, constant and noise images; and 28 broken or unusual image files), scores
them with the default model through the Beam scoring pipeline on the DirectRunner, writes Parquet
and prints a summary: rows, errors by reason, flags per source, and the most out-of-distribution
keys.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipelines import make_shards
from pipelines.options import exit_on_user_error, quiet_beam_logging

logger = logging.getLogger(__name__)

DEMO_DATA = Path(__file__).parent / "demo_data"
DEFAULT_MODEL = Path(__file__).parents[1] / "pixeldensity" / "pretrained" / "fashion_mnist_pixelcnn"

# Where each shard's samples come from, in the order the summary lists them.
SOURCES = {
    "fashion_mnist": "in-distribution: Fashion-MNIST test images 9800-9999",
    "mnist": "out-of-distribution: MNIST test digits 9800-9999",
    "cifar10": "out-of-distribution: CIFAR-10 test photographs 0-39 (colour, 32x32)",
    "junk": "junk: blank, constant and uniform-noise images",
    "badimages": "broken and edge-case files (expect errors and odd modes)",
}


def build_demo_shards(shard_dir: Path) -> dict[str, int]:
    """Writes one shard per demo source into `shard_dir`; returns samples written per source."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in ("fashion_mnist", "mnist"):
        images = DEMO_DATA / f"{name}_test_9800-images-idx3-ubyte.gz"
        labels = DEMO_DATA / f"{name}_test_9800-labels-idx1-ubyte.gz"
        source = make_shards.open_source(str(images), labels=str(labels))
        summary = make_shards.run(source, str(shard_dir / name))
        written[name] = summary.num_samples
    cifar = make_shards.open_source(str(DEMO_DATA / "cifar10_test"))
    written["cifar10"] = make_shards.run(cifar, str(shard_dir / "cifar10")).num_samples
    written["junk"] = write_raw_shard(shard_dir / "junk-000000.tar", junk_images())
    written["badimages"] = write_raw_shard(shard_dir / "badimages-000000.tar", bad_image_files())
    return written


def junk_images() -> dict[str, tuple[str, bytes]]:
    """Returns the junk samples: key -> ("png", bytes) of blank, constant and noise images."""
    rng = np.random.default_rng(0)
    arrays = {
        "blank_white": np.full((28, 28), 255, np.uint8),
        "blank_black": np.zeros((28, 28), np.uint8),
        "constant_grey": np.full((28, 28), 128, np.uint8),
        "constant_dark_grey": np.full((28, 28), 64, np.uint8),
        "uniform_noise_0": rng.integers(0, 256, (28, 28), dtype=np.uint8),
        "uniform_noise_1": rng.integers(0, 256, (28, 28), dtype=np.uint8),
        "uniform_noise_rgb": rng.integers(0, 256, (28, 28, 3), dtype=np.uint8),
    }
    return {key: ("png", make_shards.png_bytes(array)) for key, array in arrays.items()}


def bad_image_files() -> dict[str, tuple[str, bytes]]:
    """Returns the bad-image samples: key -> (extension, bytes), one per file in badimages/.

    Keys replace the dots of file names with underscores, because a WebDataset key ends at the
    first dot (`16bit.MM.cropped.tif` would otherwise become key `16bit`, extension
    `mm.cropped.tif`, and carry no image member).
    """
    samples = {}
    for path in sorted((DEMO_DATA / "badimages").iterdir()):
        if path.suffix.lower() == ".md":
            continue
        key = path.stem.replace(".", "_")
        samples[key] = (path.suffix.lower().lstrip("."), path.read_bytes())
    return samples


def write_raw_shard(path: Path, samples: dict[str, tuple[str, bytes]]) -> int:
    """Writes `samples` (key -> (extension, bytes)) unchanged into one tar shard."""
    import webdataset

    with webdataset.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for key, (extension, data) in samples.items():
            writer.write({"__key__": key, extension: data})
    return len(samples)


def summarize(table, top: int = 10) -> str:
    """Returns the human-readable summary of the demo's Parquet rows (a pyarrow Table)."""
    rows = table.to_pylist()
    metadata = {
        key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()
    }
    alpha = metadata.get("pixeldensity.alpha") or "-"
    lines = [
        f"{len(rows)} rows from {len({row['shard'] for row in rows})} shards; flags at "
        f"alpha {alpha}: is_outlier = {metadata.get('pixeldensity.ood_score_name')} p-value "
        "<= alpha, is_atypically_simple = bits/dim lower-tail p-value <= alpha",
    ]
    header = f"  {'source':14} {'rows':>5} {'ok':>5} {'errors':>6} {'is_outlier':>11} "
    lines.append(header + f"{'is_atypically_simple':>21} {'either':>12}")
    for source in SOURCES:
        group = [row for row in rows if _source_of(row["shard"]) == source]
        ok = [row for row in group if row["status"] == "ok"]
        outliers = sum(bool(row["is_outlier"]) for row in ok)
        simple = sum(bool(row["is_atypically_simple"]) for row in ok)
        either = sum(bool(row["is_outlier"] or row["is_atypically_simple"]) for row in ok)
        lines.append(
            f"  {source:14} {len(group):>5} {len(ok):>5} {len(group) - len(ok):>6} "
            f"{_rate(outliers, len(ok)):>11} {_rate(simple, len(ok)):>21} "
            f"{_rate(either, len(ok)):>12}"
        )

    reasons = Counter(row["error_reason"] for row in rows if row["status"] == "error")
    lines.append(
        "errors by reason: " + (", ".join(f"{r} {n}" for r, n in reasons.most_common()) or "none")
    )
    scored = sorted(
        (row for row in rows if row["status"] == "ok"), key=lambda row: -row["ood_score"]
    )
    lines.append("most out-of-distribution (highest ood_score, bits/dim):")
    for row in scored[:top]:
        lines.append(
            f"  {_source_of(row['shard']):14} {row['key']:24} ood_score {row['ood_score']:+.3f}"
            f"  bits/dim {row['bits_per_dim']:.3f}" + _pvalue_text(row["ood_pvalue"])
        )
    return "\n".join(lines)


def _pvalue_text(pvalue: float | None) -> str:
    return "" if pvalue is None else f"  p {pvalue:.4f}"


def _source_of(shard: str) -> str:
    return Path(shard).name.split("-")[0]


def _rate(count: int, total: int) -> str:
    return f"{count}/{total} ({count / total:.1%})" if total else "-"


def run(output_dir: Path, model: Path, extra_argv: list[str]) -> str:
    """Builds the demo shards, scores them and returns the summary text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import score

    started = time.perf_counter()
    logger.info("[1/3] building shards from %s", DEMO_DATA)
    written = build_demo_shards(output_dir / "shards")
    logger.info("      %s samples: %s", sum(written.values()), written)

    logger.info("[2/3] scoring with %s (Beam, in-process runner, CPU)", model)
    summary = score.run(
        [
            "--input",
            str(output_dir / "shards" / "*.tar"),
            "--model",
            str(model),
            "--output",
            str(output_dir / "scores"),
            *extra_argv,
        ]
    )

    logger.info("[3/3] summarising %d Parquet file(s)", len(summary.output_files))
    table = pa.concat_tables(pq.read_table(path) for path in summary.output_files)
    text = summarize(table)
    elapsed = time.perf_counter() - started
    return (
        f"{text}\nParquet: {output_dir / 'scores'}-*.parquet "
        f"(schema: docs/output_schema.md); {elapsed:.0f} s in all"
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: `python -m pipelines.demo [--output-dir DIR] [--model CKPT]`."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args, extra_argv = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    quiet_beam_logging()
    print(run(args.output_dir, args.model, extra_argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
