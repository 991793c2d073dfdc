"""Streaming training data from WebDataset shards: listing, rank split, shuffling, decoding.

The stream of one rank is a pure function of (seed, rank, epoch) and the shard list:

1. `list_shards` expands a brace and/or glob pattern (local paths, or any fsspec URL such as
   gs:// or s3:// when its filesystem package is installed) to a sorted list of shards.
2. `assign_shards` gives rank r the shards r, r + W, r + 2W, ... of W ranks: disjoint sets. A rank
   that would get none is an immediate `ValueError` on every rank, before any collective call.
3. `ShardStream` repeats the rank's shards forever. Epoch e reads them in an order shuffled by
   a generator seeded with (seed, e, rank) and passes the raw samples through a shuffle buffer
   seeded the same way. Samples are decoded after the buffer, by the project's decode policy
   (`pixeldensity.decoding.decode_image`), the same function scoring uses.

The stream's position is (epoch, raw samples drawn from the buffer in that epoch). Resuming
rebuilds the epoch's stream and skips that many raw samples without decoding them, so the
resumed run sees exactly the batches an uninterrupted run would have seen.

Undecodable samples are skipped, counted and logged with their shard and key; a shard that
cannot be opened or read is reported and skipped (samples read before the fault are kept). The
stream raises instead of training on nothing: when its first `max_initial_failures` samples
all fail, or a whole epoch yields no usable sample.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pixeldensity.decoding import DecodeError, decode_image

logger = logging.getLogger(__name__)

# Member extensions read as the image of a sample, in order of preference.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")

DEFAULT_SHUFFLE_BUFFER = 5000
DEFAULT_MAX_INITIAL_FAILURES = 100

# Individual bad samples are logged up to this many per stream; later ones are only counted.
_MAX_LOGGED_BAD_SAMPLES = 50

_GLOB_CHARACTERS = "*?["


@dataclass
class RawSample:
    """One sample as stored: its members' bytes, not yet decoded.

    Attributes:
        shard: the shard path or URL it came from.
        key: the WebDataset key (the member names up to their first dot).
        members: extension -> bytes, e.g. {"png": ..., "json": ...}.
    """

    shard: str
    key: str
    members: dict[str, bytes]


@dataclass
class DataStats:
    """Counts of what a stream read and skipped.

    Attributes:
        num_samples: samples decoded and used.
        num_bad_samples: samples skipped because they could not be decoded.
        bad_reasons: skipped samples per reason (`DecodeError.reason` or "missing_image").
        num_unreadable_shards: shard reads that failed (open error, truncated or corrupt tar).
    """

    num_samples: int = 0
    num_bad_samples: int = 0
    bad_reasons: Counter = field(default_factory=Counter)
    num_unreadable_shards: int = 0

    def to_dict(self) -> dict:
        """JSON-safe counts."""
        return {
            "num_samples": self.num_samples,
            "num_bad_samples": self.num_bad_samples,
            "bad_reasons": dict(self.bad_reasons),
            "num_unreadable_shards": self.num_unreadable_shards,
        }


def list_shards(pattern: str) -> list[str]:
    """Expands a shard pattern to a sorted, de-duplicated list of shard paths or URLs.

    Args:
        pattern: a path or URL with optional braces and globs, e.g.
            "runs/shards/train-{000000..000054}.tar", "runs/shards/train-*.tar",
            "gs://bucket/shards/train-*.tar" or "{runs/a-*.tar,runs/b-*.tar}". Remote URLs
            need fsspec and the filesystem's package (gcsfs, s3fs, ...).

    Returns:
        The matching shards, sorted.

    Raises:
        ValueError: the pattern matches nothing (the message names it).
    """
    from braceexpand import braceexpand

    shards: set[str] = set()
    for expanded in braceexpand(pattern):
        shards.update(_match(expanded))
    if not shards:
        raise ValueError(f"shard pattern {pattern!r} matched no files")
    return sorted(shards)


def assign_shards(shards: list[str], rank: int, world_size: int) -> list[str]:
    """Returns the shards of `rank`: every `world_size`-th shard from index `rank`.

    Ranks get disjoint sets whose union is all shards; sizes differ by at most one.

    Raises:
        ValueError: there are fewer shards than ranks, so some rank would get none.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if len(shards) < world_size:
        raise ValueError(
            f"{len(shards)} shard(s) cannot give each of {world_size} processes its own shard: "
            f"rank {len(shards)} would get none. Write at least {world_size} shards (lower "
            "--samples-per-shard in make_shards) or start fewer processes"
        )
    return shards[rank::world_size]


def iter_shard(shard: str, stats: DataStats | None = None) -> Iterator[RawSample]:
    """Yields the raw samples of one shard, in stored order.

    A shard that cannot be opened or read to the end is logged and counted in
    `stats.num_unreadable_shards`; the samples read before the fault are still yielded.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        with _open_binary(shard) as stream:
            files = ({**item, "__url__": shard} for item in tar_file_iterator(stream))
            for sample in group_by_keys(files):
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                yield RawSample(shard=shard, key=sample["__key__"], members=members)
    except Exception as error:  # any fault of one shard must not stop training
        if stats is not None:
            stats.num_unreadable_shards += 1
        logger.error("skipping the rest of unreadable shard %s: %s", shard, _describe(error))


def decode_sample(
    sample: RawSample, *, channels: int, size: tuple[int, int], resize: str = "center_crop"
) -> np.ndarray:
    """Decodes the image member of a sample by the project's decode policy.

    Returns:
        uint8 (C, H, W) pixels.

    Raises:
        DecodeError: no image member ("missing_image"), or the policy rejected the bytes.
    """
    for extension in IMAGE_EXTENSIONS:
        if extension in sample.members:
            data = sample.members[extension]
            return decode_image(data, channels=channels, size=size, resize=resize).image
    raise DecodeError(
        "missing_image",
        f"no image member; members are {sorted(sample.members)}, expected one of "
        f"{IMAGE_EXTENSIONS}",
    )


class SampleDecoder:
    """Decodes raw samples, skipping, counting and logging the ones that fail.

    Args:
        channels: image channels C to produce (1 or 3).
        size: (height, width) to produce.
        resize: the decode policy's resize mode.
        stats: counters to update.
    """

    def __init__(
        self,
        *,
        channels: int,
        size: tuple[int, int],
        resize: str = "center_crop",
        stats: DataStats | None = None,
    ):
        self.channels, self.size, self.resize = channels, tuple(size), resize
        self.stats = stats if stats is not None else DataStats()

    def __call__(self, sample: RawSample) -> np.ndarray | None:
        """Returns uint8 (C, H, W) pixels, or None for a sample that was skipped."""
        try:
            image = decode_sample(
                sample, channels=self.channels, size=self.size, resize=self.resize
            )
        except DecodeError as error:
            self._count_bad(sample, error)
            return None
        self.stats.num_samples += 1
        return image

    def _count_bad(self, sample: RawSample, error: DecodeError) -> None:
        stats = self.stats
        stats.num_bad_samples += 1
        stats.bad_reasons[error.reason] += 1
        if stats.num_bad_samples <= _MAX_LOGGED_BAD_SAMPLES:
            logger.warning("skipping sample %s in shard %s: %s", sample.key, sample.shard, error)
        if stats.num_bad_samples == _MAX_LOGGED_BAD_SAMPLES:
            logger.warning("further bad samples are counted but not logged one by one")


class ShardStream:
    """An endless, deterministic, shuffled stream of image batches from one rank's shards.

    Args:
        shards: this rank's shards (see `assign_shards`).
        batch_size: images per batch of this rank.
        channels, size, resize: what to decode to (see `decode_sample`).
        seed: the run's data seed.
        rank: this process's rank; with the seed and epoch it seeds the order.
        shuffle_buffer: raw samples held for shuffling (1 = no sample shuffling).
        epoch, position: where to start; from `state()` of an earlier stream when resuming.
        max_initial_failures: raise if this many raw samples are drawn before the first
            decodable one.
        stats: counters to update.

    Raises:
        RuntimeError (from `next_batch`): no usable sample, see the module docstring.
    """

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int,
        channels: int,
        size: tuple[int, int],
        resize: str = "center_crop",
        seed: int = 0,
        rank: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        epoch: int = 0,
        position: int = 0,
        max_initial_failures: int = DEFAULT_MAX_INITIAL_FAILURES,
        stats: DataStats | None = None,
    ):
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError(
                f"batch_size and shuffle_buffer must be at least 1, got {batch_size} and "
                f"{shuffle_buffer}"
            )
        self.shards, self.batch_size = list(shards), batch_size
        self.seed, self.rank, self.shuffle_buffer = seed, rank, shuffle_buffer
        self.max_initial_failures = max_initial_failures
        self.stats = stats if stats is not None else DataStats()
        self.decoder = SampleDecoder(channels=channels, size=size, resize=resize, stats=self.stats)
        self.epoch, self.position = epoch, 0
        self._epoch_good = 0
        self._raw = self._epoch_samples(epoch)
        self._skip(position)

    def state(self) -> dict[str, int]:
        """The stream position: {"epoch": e, "position": raw samples drawn in epoch e}."""
        return {"epoch": self.epoch, "position": self.position}

    def next_batch(self) -> torch.Tensor:
        """Returns the next batch, uint8 (batch_size, C, H, W)."""
        images = []
        while len(images) < self.batch_size:
            image = self.decoder(self._next_raw())
            if image is not None:
                images.append(torch.from_numpy(image))
                self._epoch_good += 1
            self._check_not_starved()
        return torch.stack(images)  # (B, C, H, W)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def _next_raw(self) -> RawSample:
        """The next raw sample, moving to the next epoch when this one ends."""
        while True:
            sample = next(self._raw, None)
            if sample is not None:
                self.position += 1
                return sample
            if self._epoch_good == 0:
                raise RuntimeError(
                    f"rank {self.rank}: a full pass over its {len(self.shards)} shard(s) "
                    f"({self.shards[0]} ...) gave no usable sample; data stats "
                    f"{self.stats.to_dict()}"
                )
            self.epoch, self.position, self._epoch_good = self.epoch + 1, 0, 0
            self._raw = self._epoch_samples(self.epoch)

    def _check_not_starved(self) -> None:
        stats = self.stats
        if stats.num_samples == 0 and stats.num_bad_samples >= self.max_initial_failures:
            raise RuntimeError(
                f"rank {self.rank}: the first {stats.num_bad_samples} samples read could not "
                f"be decoded ({dict(stats.bad_reasons)}); refusing to train on nothing. Check "
                f"the shards ({self.shards[0]} ...), --channels and the decode policy"
            )

    def _skip(self, num_raw: int) -> None:
        """Draws `num_raw` raw samples of the current epoch without decoding them."""
        for _ in range(num_raw):
            if next(self._raw, None) is None:
                raise ValueError(
                    f"cannot resume rank {self.rank} at position {num_raw} of epoch "
                    f"{self.epoch}: the epoch holds only {self.position} samples; the shards "
                    "changed since the checkpoint"
                )
            self.position += 1
        # A resumed epoch had usable samples before the checkpoint, or the run would have failed.
        self._epoch_good = int(num_raw > 0)

    def _epoch_samples(self, epoch: int) -> Iterator[RawSample]:
        """The raw samples of one epoch: shards in a seeded order, through a seeded buffer."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        order = rng.permutation(len(self.shards))
        samples = (
            sample for index in order for sample in iter_shard(self.shards[index], self.stats)
        )
        return shuffle_buffered(samples, self.shuffle_buffer, rng)


def shuffle_buffered(
    items: Iterator[RawSample], buffer_size: int, rng: np.random.Generator
) -> Iterator[RawSample]:
    """Shuffles a stream through a buffer of `buffer_size` items, reproducibly.

    Once the buffer is full, each new item takes the place of a uniformly chosen buffered item,
    which is yielded; at the end the rest of the buffer is yielded in a random order.
    """
    buffer: list[RawSample] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = int(rng.integers(buffer_size))
        buffer[index], item = item, buffer[index]
        yield item
    for index in rng.permutation(len(buffer)):
        yield buffer[index]


def iter_eval_batches(
    shards: list[str],
    *,
    batch_size: int,
    channels: int,
    size: tuple[int, int],
    resize: str = "center_crop",
    max_samples: int | None = None,
    stats: DataStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yields batches of the shards' samples in stored order, once; the last may be smaller.

    Args:
        shards: the shards to read.
        batch_size: images per batch.
        channels, size, resize: what to decode to.
        max_samples: stop after this many decoded samples; None for all.
        stats: counters to update (bad samples are skipped as in training).

    Yields:
        uint8 (N, C, H, W) batches.
    """
    decoder = SampleDecoder(channels=channels, size=size, resize=resize, stats=stats)
    images: list[torch.Tensor] = []
    num_images = 0
    samples = (sample for shard in shards for sample in iter_shard(shard, decoder.stats))
    for sample in samples:
        if max_samples is not None and num_images >= max_samples:
            break
        image = decoder(sample)
        if image is None:
            continue
        images.append(torch.from_numpy(image))
        num_images += 1
        if len(images) == batch_size:
            yield torch.stack(images)  # (batch_size, C, H, W)
            images = []
    if images:
        yield torch.stack(images)


def _match(pattern: str) -> list[str]:
    """Shards matching one brace-free pattern; a pattern without glob characters is itself."""
    if "://" in pattern and not pattern.startswith("file://"):
        return _match_remote(pattern)
    pattern = pattern.removeprefix("file://")
    if any(character in pattern for character in _GLOB_CHARACTERS):
        return glob.glob(pattern)
    return [pattern] if os.path.exists(pattern) else []


def _match_remote(pattern: str) -> list[str]:
    """Matches a remote URL pattern through fsspec (imported only here)."""
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"reading {pattern!r} needs fsspec: pip install fsspec") from None
    filesystem, path = fsspec.core.url_to_fs(pattern)
    if any(character in path for character in _GLOB_CHARACTERS):
        matches = filesystem.glob(path)
    else:
        matches = [path] if filesystem.exists(path) else []
    # Both branches give URLs in the file system's own spelling, so patterns compare equal.
    return [filesystem.unstrip_protocol(match) for match in matches]


def _open_binary(shard: str):
    """Opens a local path or an fsspec URL for reading bytes."""
    if "://" in shard and not shard.startswith("file://"):
        import fsspec

        return fsspec.open(shard, "rb").open()
    return open(shard.removeprefix("file://"), "rb")


def _describe(error: Exception) -> str:
    """Names an error; webdataset appends streams to `args`, so only the first is kept."""
    if isinstance(error, OSError) or len(error.args) <= 1:
        return f"{type(error).__name__}: {error}"
    return f"{type(error).__name__}: {error.args[0]}"
