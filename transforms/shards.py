"""Read WebDataset tar shards into samples: the `ReadImageShards` transform and its pure core.

A shard is a tar file, plain or gzip-compressed, on any filesystem Beam knows (local, gs://,
s3://). Members are grouped into samples the WebDataset way:

- The key is the member path up to the first dot of its base name, directories included;
  the extension is the rest, lower-cased. `dir/a.b.JPG` is key `dir/a`, extension `b.jpg`.
- Consecutive members with the same key form one sample. A key that comes back later in the
  same shard starts a new sample (and so a second row), as in WebDataset.
- Directories, links and other non-regular members are skipped, and so are names whose base
  has nothing before its first dot (`.DS_Store`, `._a.jpg`) or no dot at all (`README`).

Every sample ends as exactly one element: a `Sample`, or an `ErrorRow` when

- no member has an image extension (`"missing_image"`, see `IMAGE_EXTENSIONS`);
- an extension occurs twice within one sample (`"duplicate_member"`; the sample is ambiguous,
  so none of it is kept);
- the shard breaks while the sample is being read (`"truncated_shard"`, once per shard; the
  samples completed before the break are kept). A shard that ends without tar's end-of-archive
  block counts as broken, and the sample in progress is reported, since more of its members
  may have been lost;
- the file is not a readable tar at all, e.g. empty (`"unreadable_shard"`, one row, key None).

Errors of the filesystem itself (permissions, network) are raised, not turned into rows, so
that the runner retries the work and a persistent failure stops the job loudly.
"""

import collections.abc
import dataclasses
import gzip
import logging
import tarfile
import zlib

import apache_beam as beam
import braceexpand
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.types import (
    METRICS_NAMESPACE,
    REASON_DUPLICATE_MEMBER,
    REASON_MISSING_IMAGE,
    REASON_TRUNCATED_SHARD,
    REASON_UNREADABLE_SHARD,
    ErrorRow,
    Sample,
)

logger = logging.getLogger(__name__)

# Member extensions taken as the sample's image, in order of preference. Only a whole
# extension counts: "seg.png" is an auxiliary field of the sample, not its image.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "pbm")

_GZIP_MAGIC = b"\x1f\x8b"
_TAR_BLOCK_BYTES = 512

# Shard errors that say something about the file's contents, as opposed to I/O failures.
_CONTENT_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


@dataclasses.dataclass(frozen=True)
class _Member:
    """A regular file read from a tar stream."""

    name: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class _Break:
    """Where and why a tar stream stopped before its proper end.

    Attributes:
        offset: Byte offset in the (decompressed) tar stream of the header that failed.
        member: Name of the member being read when it failed, or None if between members.
        message: What went wrong.
        num_headers: Member headers (of any type) parsed before the break.
    """

    offset: int
    member: str | None
    message: str
    num_headers: int


class _TailRecorder:
    """A read-only file wrapper that counts bytes and remembers the most recent ones.

    `tarfile` stops silently when a stream ends between members, so whether the stream
    really ended with tar's end-of-archive block has to be checked afterwards.
    """

    def __init__(self, fileobj, keep_bytes: int = 64 * 1024):
        """Wraps `fileobj`, keeping the last `keep_bytes` bytes read."""
        # `read1` (GzipFile has it) returns what is decoded so far instead of insisting on the
        # full request, so the members before a break in a gzip stream are still delivered.
        self._read = getattr(fileobj, "read1", fileobj.read)
        self._keep_bytes = keep_bytes
        self._tail = bytearray()
        self._tail_start = 0
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        """Reads like `io.RawIOBase.read`, recording what was read."""
        data = self._read(size)
        self.position += len(data)
        self._tail += data
        excess = len(self._tail) - self._keep_bytes
        if excess > 0:
            del self._tail[:excess]
            self._tail_start += excess
        return data

    def block_at(self, offset: int, size: int) -> bytes:
        """Returns up to `size` bytes from stream offset `offset`, reading further if needed.

        Fewer than `size` bytes come back when the stream ends first.
        """
        while self.position < offset + size and self.read(offset + size - self.position):
            pass
        assert offset >= self._tail_start, "tar offset fell out of the recorded tail"
        start = offset - self._tail_start
        return bytes(self._tail[start : start + size])


class _PrefixedReader:
    """A file-like reader that first returns `prefix`, then the rest of `fileobj`."""

    def __init__(self, prefix: bytes, fileobj):
        """Chains `prefix` (bytes already read) in front of `fileobj`."""
        self._prefix = prefix
        self._fileobj = fileobj

    def read(self, size: int = -1) -> bytes:
        """Reads like `io.RawIOBase.read`."""
        if not self._prefix:
            return self._fileobj.read(size)
        if size is None or size < 0:
            data, self._prefix = self._prefix + self._fileobj.read(), b""
            return data
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        if len(data) < size:
            data += self._fileobj.read(size - len(data))
        return data


def expand_pattern(pattern: str) -> list[str]:
    """Expands shell-style braces, e.g. "s-{000..002}.tar" to three names, in order.

    Beam's file matching understands globs but not braces, so braces are expanded first.

    Raises:
        ValueError: If `pattern` is not a non-empty string.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty string, got {pattern!r}")
    return list(braceexpand.braceexpand(pattern))


def match_shards(pattern: str) -> list[str]:
    """Lists the shard files a pattern names, braces expanded, then globs matched by Beam.

    Args:
        pattern: A path or URL with optional braces and globs, e.g.
            "gs://bucket/train-{000000..000099}.tar" or "/data/*.tar.gz".

    Returns:
        Matched paths, each glob's matches sorted, duplicates removed, first occurrence kept.

    Raises:
        ValueError: If any expanded pattern matches no file (the first few are named).
    """
    paths: dict[str, None] = {}
    unmatched = []
    for expanded in expand_pattern(pattern):
        match = FileSystems.match([expanded])[0]
        found = sorted(metadata.path for metadata in match.metadata_list)
        if not found:
            unmatched.append(expanded)
        paths.update(dict.fromkeys(found))
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        raise ValueError(
            f"pattern {pattern!r} names {len(unmatched)} path(s) that match no file: {shown}"
        )
    return list(paths)


def split_member_name(name: str) -> tuple[str, str] | None:
    """Splits a tar member name into (key, extension) the WebDataset way.

    The key is everything up to the first dot of the base name (the directory part included,
    dots in directory names kept); the extension is the rest, lower-cased.

    Returns:
        (key, extension), or None for names that belong to no sample: no dot in the base
        name, nothing before its first dot, or nothing after it.
    """
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot or not extension:
        return None
    key = f"{directory}/{stem}" if directory else stem
    return key, extension.lower()


def select_image_member(members: collections.abc.Mapping[str, bytes]) -> str | None:
    """Returns the extension of a sample's image member, by `IMAGE_EXTENSIONS` order.

    Returns:
        The first extension of `IMAGE_EXTENSIONS` present in `members`, or None.
    """
    for extension in IMAGE_EXTENSIONS:
        if extension in members:
            return extension
    return None


def read_shard(path: str) -> collections.abc.Iterator[Sample | ErrorRow]:
    """Reads one shard from any Beam filesystem, yielding its samples in tar order.

    Args:
        path: Path or URL of a tar or gzip-compressed tar file.

    Yields:
        One `Sample` or `ErrorRow` per sample; one `ErrorRow` for an unreadable shard.

    Raises:
        OSError: For filesystem failures other than the path being a directory.
    """
    try:
        fileobj = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    except IsADirectoryError:
        yield ErrorRow(path, None, None, REASON_UNREADABLE_SHARD, "path is a directory")
        return
    with fileobj:
        yield from read_shard_stream(fileobj, shard=path)


def read_shard_stream(fileobj, *, shard: str) -> collections.abc.Iterator[Sample | ErrorRow]:
    """Reads samples from an open tar stream, gzip-compressed or not.

    Args:
        fileobj: A binary file-like object positioned at the start of the shard; only its
            `read` method is used.
        shard: The shard's path or URL, recorded in every element.

    Yields:
        One `Sample` or `ErrorRow` per sample; one `ErrorRow` for an unreadable shard.
    """
    stream = _TailRecorder(_decompressed(fileobj))
    yield from _group_samples(_iter_members(stream), shard)


def _decompressed(fileobj):
    """Returns a reader of the tar bytes, gunzipping when the stream starts with gzip's magic."""
    prefix = b""
    while len(prefix) < len(_GZIP_MAGIC):
        chunk = fileobj.read(len(_GZIP_MAGIC) - len(prefix))
        if not chunk:
            break
        prefix += chunk
    reader = _PrefixedReader(prefix, fileobj)
    if prefix == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=reader, mode="rb")
    return reader


def _iter_members(stream: _TailRecorder) -> collections.abc.Iterator[_Member | _Break]:
    """Yields the regular files of a tar stream, then a `_Break` if it did not end properly."""
    num_headers = 0
    archive = None
    info = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for info in archive:
                num_headers += 1
                if info.isfile():
                    yield _Member(info.name, archive.extractfile(info).read())
                info = None
            end_offset = archive.offset
    except _CONTENT_ERRORS as error:
        # `offset` is the header of the member being read, else the header tarfile was parsing.
        if info is not None:
            offset, member = info.offset, info.name
        else:
            offset, member = (archive.offset if archive is not None else 0), None
        yield _Break(offset, member, f"{type(error).__name__}: {error}", num_headers)
        return

    # tarfile ends quietly at a missing, short or garbled header; only an all-zero block
    # at the end offset means the archive was written to its end.
    block = stream.block_at(end_offset, _TAR_BLOCK_BYTES)
    if len(block) < _TAR_BLOCK_BYTES:
        yield _Break(end_offset, None, "stream ends without an end-of-archive block", num_headers)
    elif block.count(0) != _TAR_BLOCK_BYTES:
        yield _Break(end_offset, None, "invalid tar header", num_headers)


def _group_samples(
    items: collections.abc.Iterable[_Member | _Break], shard: str
) -> collections.abc.Iterator[Sample | ErrorRow]:
    """Groups consecutive members with the same key into samples (see the module docstring)."""
    key: str | None = None
    members: dict[str, bytes] = {}
    duplicates: list[str] = []
    for item in items:
        if isinstance(item, _Break):
            yield from _break_rows(item, shard, key, members, duplicates)
            return

        parts = split_member_name(item.name)
        if parts is None:
            logger.debug("skipping tar member %r of %s: not part of a sample", item.name, shard)
            continue

        member_key, extension = parts
        if member_key != key:
            if key is not None:
                yield _finish_sample(shard, key, members, duplicates)
            key, members, duplicates = member_key, {}, []
        if extension in members:
            duplicates.append(extension)
        else:
            members[extension] = item.data

    if key is not None:
        yield _finish_sample(shard, key, members, duplicates)


def _finish_sample(
    shard: str, key: str, members: dict[str, bytes], duplicates: list[str]
) -> Sample | ErrorRow:
    """Turns a completed group of members into a `Sample`, or an `ErrorRow` if it is unusable."""
    if duplicates:
        return ErrorRow(
            shard,
            key,
            duplicates[0],
            REASON_DUPLICATE_MEMBER,
            f"member {key}.{duplicates[0]} occurs more than once in the sample",
        )
    if select_image_member(members) is None:
        return ErrorRow(
            shard,
            key,
            None,
            REASON_MISSING_IMAGE,
            f"sample has members {sorted(members)} but none of {IMAGE_EXTENSIONS}",
        )
    return Sample(shard, key, members)


def _break_rows(
    item: _Break,
    shard: str,
    key: str | None,
    members: dict[str, bytes],
    duplicates: list[str],
) -> collections.abc.Iterator[Sample | ErrorRow]:
    """Ends a shard at a break: the one error row, after the last complete sample if any.

    The sample in progress is complete only when the break happened inside a member of a
    different key; otherwise it becomes the error row, as members of it may be missing.
    """
    if item.num_headers == 0:
        yield ErrorRow(
            shard,
            None,
            None,
            REASON_UNREADABLE_SHARD,
            f"no tar member could be read: {item.message}",
        )
        return

    broken = split_member_name(item.member) if item.member is not None else None
    broken_key = broken[0] if broken is not None else key
    if key is not None and broken_key != key:
        yield _finish_sample(shard, key, members, duplicates)

    where = f"at byte {item.offset}"
    if item.member is not None:
        where += f" in member {item.member!r}"
    yield ErrorRow(
        shard,
        broken_key,
        broken[1] if broken is not None else None,
        REASON_TRUNCATED_SHARD,
        f"shard broke {where} of the tar stream: {item.message}",
    )


class _ReadShardFn(beam.DoFn):
    """Reads one shard path into samples and error rows, counting both."""

    def __init__(self):
        self._shards_read = Metrics.counter(METRICS_NAMESPACE, "shards_read")
        self._samples_read = Metrics.counter(METRICS_NAMESPACE, "samples_read")
        self._read_errors = Metrics.counter(METRICS_NAMESPACE, "read_errors")

    def process(self, path: str):
        """Yields the samples and error rows of the shard at `path`."""
        for element in read_shard(path):
            if isinstance(element, ErrorRow):
                self._read_errors.inc()
            else:
                self._samples_read.inc()
            yield element
        self._shards_read.inc()


class ReadImageShards(beam.PTransform):
    """Reads WebDataset shards into one element per sample.

    The pattern is matched when the transform is applied, so a missing shard fails pipeline
    construction. Shards are then spread over workers and read in parallel, one shard per
    element.

    Input: the pipeline (PBegin). Output: a PCollection of `Sample` and `ErrorRow` elements,
    one per sample (see the module docstring for the error cases).

    Counters (namespace "pixeldensity"): `shards_read`, `samples_read` (Sample elements) and
    `read_errors` (ErrorRow elements).
    """

    def __init__(self, pattern: str):
        """Creates the transform.

        Args:
            pattern: Shard path or URL with optional braces and globs, e.g.
                "gs://bucket/train-{000000..000099}.tar".

        Raises:
            ValueError: If `pattern` is not a non-empty string.
        """
        super().__init__()
        expand_pattern(pattern)
        self._pattern = pattern

    def expand(self, pbegin):
        """Matches the shards and reads them; raises ValueError if a pattern matches nothing."""
        paths = match_shards(self._pattern)
        logger.info("reading %d shard(s) matching %s", len(paths), self._pattern)
        return (
            pbegin
            | "ListShards" >> beam.Create(paths)
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadShards" >> beam.ParDo(_ReadShardFn())
        )
