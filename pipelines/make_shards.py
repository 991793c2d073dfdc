"""Writes WebDataset shards of lossless PNG images from folders, IDX files, npz arrays or zips.

Each sample is two members: `KEY.png`, the image as 8-bit greyscale or RGB PNG, and `KEY.json`,
`{"index", "source", "label", "class_name", "original_width", "original_height",
"original_mode", "original_format"}`. The key is the image's index in its source, zero-padded
(never with a dot, which would end a WebDataset key early). Shards are `PREFIX-000000.tar`,
`PREFIX-000001.tar`, ... of `--samples-per-shard` samples each, written in a deterministic order:
the source's own order (`pipelines.sources`), or a seeded permutation of it, then the index
range `[start, start + limit)`. So `--limit 55000` and `--start 55000` split one source into
disjoint training and validation shards.

Image files are passed through the project's decode policy (`pixeldensity.decoding`) at their
own size and channel count unless `--channels`/`--size` ask for others; files it rejects are
skipped, counted and logged. Array images are stored exactly.

    python -m pipelines.make_shards /work/shared/data/fashion_mnist/t10k-images-idx3-ubyte.gz \\
        runs/shards/fashion_test --labels /work/shared/data/fashion_mnist/t10k-labels-idx1-ubyte.gz
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines import sources
from pipelines.options import exit_on_user_error
from pixeldensity.decoding import RESIZE_MODES, DecodeError, decode_image

logger = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 1000

# Fixed member timestamps make the same input produce byte-identical shards.
_TAR_MTIME = 0.0

_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N")
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


@dataclass
class ShardSummary:
    """What a `run` wrote.

    Attributes:
        shards: paths of the shard files, in order.
        num_samples: samples written.
        num_skipped: source images skipped because the decode policy rejected them.
        skipped_reasons: count of skipped images per `DecodeError.reason`.
        num_bytes: total size of the shard files in bytes.
    """

    shards: list[str] = field(default_factory=list)
    num_samples: int = 0
    num_skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    num_bytes: int = 0


def open_source(
    path: str,
    *,
    source_format: str = "auto",
    labels: str | None = None,
    images_key: str = "images",
    labels_key: str | None = None,
    labels_from_folders: bool = False,
    include: str | None = None,
) -> sources.ImageSource:
    """Opens an image source; `source_format="auto"` picks it from the path.

    A directory is a folder source, `*.zip` a zip, `*.npz` an npz archive, anything else IDX.

    Args:
        path: the folder, IDX image file, npz file or zip archive.
        source_format: "auto" or one of `pipelines.sources.FORMATS`.
        labels: the IDX label file (IDX sources only).
        images_key: the image array's name (npz sources).
        labels_key: the label array's name (npz sources); None for no labels.
        labels_from_folders: take labels from folder names (folder and zip sources).
        include: a glob on relative paths to keep (folder and zip sources).

    Returns:
        The source, with `len()` and `read(index) -> SourceRecord`.
    """
    if source_format == "auto":
        source_format = _detect_format(path)
    if source_format not in sources.FORMATS:
        raise ValueError(
            f"source_format must be 'auto' or one of {sources.FORMATS}, got {source_format!r}"
        )
    if source_format == "idx":
        return sources.idx_source(path, labels)
    if source_format == "npz":
        return sources.npz_source(path, images_key=images_key, labels_key=labels_key)
    source_class = sources.FolderSource if source_format == "folder" else sources.ZipSource
    return source_class(path, labels_from_folders=labels_from_folders, include=include)


def select_indices(
    num_images: int, *, start: int = 0, limit: int | None = None, shuffle_seed: int | None = None
) -> np.ndarray:
    """Returns the source indices to write, in writing order.

    Args:
        num_images: images in the source.
        start: first position (after the optional permutation) to write.
        limit: how many to write from `start`; None for all the rest.
        shuffle_seed: when given, positions refer to a permutation of the source drawn from
            `numpy.random.default_rng(shuffle_seed)`, the same on every machine.

    Returns:
        (M,) int64 indices.
    """
    if start < 0 or start > num_images:
        raise ValueError(f"start must be in 0..{num_images} (the source size), got {start}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative or None, got {limit}")
    order = np.arange(num_images, dtype=np.int64)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(num_images)
    stop = num_images if limit is None else min(num_images, start + limit)
    return order[start:stop]


def encode_record(
    record: sources.SourceRecord,
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    resize: str = "center_crop",
) -> tuple[bytes, dict]:
    """Turns one source record into PNG bytes and its JSON metadata.

    Args:
        record: the record to encode.
        channels: 1 or 3 to convert; None keeps the image's own (grey stays grey).
        size: (height, width) to resize to by the decode policy; None keeps the size.
        resize: the decode policy's resize mode when `size` changes the aspect ratio.

    Returns:
        (png_bytes, metadata) for the `png` and `json` members.

    Raises:
        DecodeError: the record's file is rejected by the decode policy.
    """
    if record.pixels is not None:
        pixels = record.pixels
        original = (pixels.shape[1], pixels.shape[0], "L" if pixels.ndim == 2 else "RGB")
        if channels is not None or size is not None:
            pixels = _apply_policy(pixels, channels, size, resize)
        original_format = "array"
    else:
        native_channels, native_size, original = _native_layout(record.data)
        decoded = decode_image(
            record.data,
            channels=channels or native_channels,
            size=tuple(size or native_size),
            resize=resize,
        )
        pixels = _chw_to_hw(decoded.image)
        original_format = decoded.original_format

    metadata = {
        "index": record.index,
        "source": record.source,
        "label": record.label,
        "class_name": record.class_name,
        "original_width": original[0],
        "original_height": original[1],
        "original_mode": original[2],
        "original_format": original_format,
    }
    return png_bytes(pixels), metadata


def raw_sample(record: sources.SourceRecord, key: str) -> dict:
    """Returns the WebDataset sample of a file stored unchanged: its bytes under its own
    lower-cased extension, plus the JSON member (index, source path, label)."""
    if record.data is None:
        raise ValueError(
            f"raw shards need encoded image files (folder or zip sources); {record.source} "
            "is a pixel array"
        )
    extension = os.path.splitext(record.source)[1].lower().lstrip(".") or "bin"
    metadata = {
        "index": record.index,
        "source": record.source,
        "label": record.label,
        "class_name": record.class_name,
    }
    return {"__key__": key, extension: record.data, "json": json.dumps(metadata).encode()}


def run(
    source: sources.ImageSource,
    output_prefix: str,
    *,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    start: int = 0,
    limit: int | None = None,
    shuffle_seed: int | None = None,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    resize: str = "center_crop",
    raw: bool = False,
) -> ShardSummary:
    """Writes the selected images of `source` as shards `output_prefix-NNNNNN.tar`.

    Args:
        source: a source from `open_source`, or any `ImageSource`.
        output_prefix: path prefix of the shards; its folder is created.
        samples_per_shard: samples per shard file (the last one may hold fewer).
        start, limit, shuffle_seed: the selection, see `select_indices`.
        channels, size, resize: optional conversion, see `encode_record`.
        raw: store each file's bytes unchanged, under its own extension, without decoding
            (folder and zip sources): for shards that are to be scored, so that broken files
            reach the scorer and get their error row instead of being skipped here.

    Returns:
        A `ShardSummary` of what was written.
    """
    import webdataset

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    indices = select_indices(len(source), start=start, limit=limit, shuffle_seed=shuffle_seed)
    if len(indices) == 0:
        raise ValueError(
            f"nothing to write: the source holds {len(source)} images and the selection "
            f"start={start}, limit={limit} is empty"
        )
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    key_width = max(6, len(str(len(source) - 1)))

    summary, skipped = ShardSummary(), Counter()
    with webdataset.ShardWriter(
        f"{output_prefix}-%06d.tar",
        maxcount=samples_per_shard,
        verbose=0,
        encoder=False,
        mtime=_TAR_MTIME,
        post=summary.shards.append,
    ) as writer:
        for index in indices:
            record = source.read(int(index))
            key = f"{record.index:0{key_width}d}"
            if raw:
                writer.write(raw_sample(record, key))
                summary.num_samples += 1
                continue
            try:
                png, metadata = encode_record(record, channels=channels, size=size, resize=resize)
            except DecodeError as error:
                skipped[error.reason] += 1
                logger.warning("skipping %s: %s", record.source, error)
                continue
            writer.write({"__key__": key, "png": png, "json": json.dumps(metadata).encode()})
            summary.num_samples += 1

    summary.num_skipped = sum(skipped.values())
    summary.skipped_reasons = dict(skipped)
    summary.num_bytes = sum(os.path.getsize(shard) for shard in summary.shards)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser of `make_shards`."""
    parser = argparse.ArgumentParser(
        prog="pixeldensity make-shards",
        description="Write WebDataset shards (KEY.png + KEY.json) from an image source.",
    )
    parser.add_argument("source", help="a folder, an IDX file (.gz or not), an .npz or a .zip")
    parser.add_argument("output_prefix", help="shards are written as PREFIX-000000.tar, ...")
    parser.add_argument("--format", default="auto", choices=("auto", *sources.FORMATS))
    parser.add_argument("--labels", help="IDX label file for an IDX image file")
    parser.add_argument("--images-key", default="images", help="npz: image array name")
    parser.add_argument("--labels-key", help="npz: label array name (default: no labels)")
    parser.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="folder/zip: label images by sub-folder name (sorted names -> 0, 1, ...)",
    )
    parser.add_argument("--include", help="folder/zip: glob on relative paths, e.g. 'test/*'")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    parser.add_argument("--start", type=int, default=0, help="first position to write")
    parser.add_argument("--limit", type=int, help="how many images to write (default: all)")
    parser.add_argument(
        "--shuffle-seed",
        type=int,
        help="write a seeded permutation of the source instead of its own order",
    )
    parser.add_argument("--channels", type=int, choices=(1, 3), help="convert to 1 or 3")
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), help="resize to this size"
    )
    parser.add_argument("--resize", default="center_crop", choices=RESIZE_MODES)
    parser.add_argument(
        "--raw",
        action="store_true",
        help="folder/zip: store files unchanged (no decoding, nothing skipped), for scoring",
    )
    return parser


def main(argv: list[str] | None = None) -> ShardSummary:
    """Command-line entry point: `python -m pipelines.make_shards SOURCE PREFIX [options]`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    source = open_source(
        args.source,
        source_format=args.format,
        labels=args.labels,
        images_key=args.images_key,
        labels_key=args.labels_key,
        labels_from_folders=args.labels_from_folders,
        include=args.include,
    )
    summary = run(
        source,
        args.output_prefix,
        samples_per_shard=args.samples_per_shard,
        start=args.start,
        limit=args.limit,
        shuffle_seed=args.shuffle_seed,
        channels=args.channels,
        size=tuple(args.size) if args.size else None,
        resize=args.resize,
        raw=args.raw,
    )
    logger.info(
        "wrote %d samples in %d shards (%.1f MB) to %s-*.tar; skipped %d%s",
        summary.num_samples,
        len(summary.shards),
        summary.num_bytes / 1e6,
        args.output_prefix,
        summary.num_skipped,
        f" {summary.skipped_reasons}" if summary.skipped_reasons else "",
    )
    return summary


def _detect_format(path: str) -> str:
    if os.path.isdir(path):
        return "folder"
    suffix = Path(path).suffix.lower()
    if suffix in (".zip", ".npz"):
        return suffix[1:]
    return "idx"


def _native_layout(data: bytes) -> tuple[int, tuple[int, int], tuple[int, int, str]]:
    """Reads an image file's header without decoding the pixels.

    Returns:
        (channels, displayed (height, width), stored (width, height, mode)). Channels is 1 for
        greyscale modes and 3 otherwise. The displayed size swaps width and height when the
        EXIF orientation turns the image by 90 degrees, because the decode policy applies that
        rotation before resizing.

    Raises:
        DecodeError: Pillow cannot identify the file.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height, mode = image.width, image.height, image.mode
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception as error:
        raise DecodeError("unidentified_image", f"cannot read the image header: {error}") from None
    channels = 1 if mode in _GREY_MODES else 3
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return channels, (width, height), (width, height, mode)
    return channels, (height, width), (width, height, mode)


def _apply_policy(
    pixels: np.ndarray, channels: int | None, size: tuple[int, int] | None, resize: str
) -> np.ndarray:
    """Runs (H, W) or (H, W, 3) array pixels through the decode policy, via a PNG of them.

    Returns:
        The converted pixels, (H', W') or (H', W', 3) uint8.
    """
    native_channels = 1 if pixels.ndim == 2 else 3
    decoded = decode_image(
        png_bytes(pixels),
        channels=channels or native_channels,
        size=tuple(size or pixels.shape[:2]),
        resize=resize,
    )
    return _chw_to_hw(decoded.image)


def _chw_to_hw(image: np.ndarray) -> np.ndarray:
    """(1, H, W) -> (H, W); (3, H, W) -> (H, W, 3)."""
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encodes (H, W) or (H, W, 3) uint8 pixels as an 8-bit PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main)())
