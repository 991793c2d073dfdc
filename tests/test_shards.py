"""Tests for transforms.shards: matching shards and grouping tar members into samples."""

import gzip
import io
import random
import tarfile
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.shards import (
    ReadImageShards,
    expand_pattern,
    match_shards,
    read_shard,
    read_shard_stream,
    select_image_member,
    split_member_name,
)
from transforms.types import ErrorRow, Sample

SAMPLE_SHARD = Path(__file__).parent / "data" / "webdataset" / "sample.tgz"


def _tar_bytes(members: list[tuple[str, bytes]], directories: tuple[str, ...] = ()) -> bytes:
    """A tar archive holding `directories` and then `members`, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name in directories:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _read_bytes(data: bytes, shard: str = "mem.tar") -> list:
    return list(read_shard_stream(io.BytesIO(data), shard=shard))


def _keys(rows) -> list[tuple[str, str | None]]:
    return [(type(row).__name__, row.key) for row in rows]


THREE_SAMPLES = [
    ("a.png", b"A" * 700),
    ("a.cls", b"0"),
    ("b.png", b"B" * 1500),
    ("b.cls", b"1"),
    ("c.png", b"C" * 900),
    ("c.cls", b"2"),
]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.png", ("a", "png")),
        ("a.b.jpg", ("a", "b.jpg")),
        ("IMG_1.JPG", ("IMG_1", "jpg")),
        ("dir/sub/x.seg.PNG", ("dir/sub/x", "seg.png")),
        ("dir.v2/x.png", ("dir.v2/x", "png")),
        ("./000.png", ("./000", "png")),
        ("README", None),
        (".DS_Store", None),
        ("dir/._a.jpg", None),
        ("trailing.", None),
    ],
)
def test_split_member_name(name, expected):
    assert split_member_name(name) == expected


def test_select_image_member_priority():
    assert select_image_member({"jpg": b"", "png": b"", "cls": b""}) == "png"
    assert select_image_member({"webp": b"", "tiff": b""}) == "webp"
    assert select_image_member({"seg.png": b"", "cls": b""}) is None


def test_read_shard_groups_consecutive_members(tmp_path):
    members = [
        ("a.b.jpg", b"1"),
        ("a.png", b"2"),
        ("a.CLS", b"3"),
        ("dir/b.JPEG", b"4"),
        ("dir/b.json", b"5"),
        ("README", b"6"),
    ]
    path = _write(tmp_path / "s.tar", _tar_bytes(members, directories=("dir",)))

    rows = list(read_shard(path))

    assert rows == [
        Sample(path, "a", {"b.jpg": b"1", "png": b"2", "cls": b"3"}),
        Sample(path, "dir/b", {"jpeg": b"4", "json": b"5"}),
    ]


def test_read_shard_skips_links(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("a.png")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"png"))
        link = tarfile.TarInfo("a.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "a.png"
        archive.addfile(link)

    rows = _read_bytes(buffer.getvalue())

    assert rows == [Sample("mem.tar", "a", {"png": b"png"})]


def test_read_shard_sample_without_image_is_error_row():
    rows = _read_bytes(_tar_bytes([("a.png", b"1"), ("b.cls", b"2"), ("b.json", b"{}")]))

    assert rows[0] == Sample("mem.tar", "a", {"png": b"1"})
    assert rows[1].reason == "missing_image"
    assert (rows[1].key, rows[1].member) == ("b", None)
    assert "['cls', 'json']" in rows[1].message


def test_read_shard_duplicate_member_is_error_row():
    members = [("a.png", b"1"), ("a.PNG", b"2"), ("b.png", b"3")]

    rows = _read_bytes(_tar_bytes(members))

    assert rows[0] == ErrorRow(
        "mem.tar",
        "a",
        "png",
        "duplicate_member",
        "member a.png occurs more than once in the sample",
    )
    assert rows[1] == Sample("mem.tar", "b", {"png": b"3"})


def test_read_shard_repeated_key_later_is_new_sample():
    rows = _read_bytes(_tar_bytes([("a.png", b"1"), ("b.png", b"2"), ("a.png", b"3")]))

    assert _keys(rows) == [("Sample", "a"), ("Sample", "b"), ("Sample", "a")]


def test_read_shard_gzip_same_as_plain(tmp_path):
    plain = _tar_bytes(THREE_SAMPLES)
    plain_path = _write(tmp_path / "s.tar", plain)
    gzip_path = _write(tmp_path / "s.tar.gz", gzip.compress(plain))

    plain_rows = list(read_shard(plain_path))
    gzip_rows = list(read_shard(gzip_path))

    assert [row.members for row in gzip_rows] == [row.members for row in plain_rows]
    assert len(gzip_rows) == 3


def test_read_shard_truncated_in_member_data():
    data = _tar_bytes(THREE_SAMPLES)
    # Blocks of 512: a.png header + 2 data, a.cls header + 1, so b.png's header is at 2560.
    rows = _read_bytes(data[:3500])

    assert _keys(rows) == [("Sample", "a"), ("ErrorRow", "b")]
    assert rows[1].reason == "truncated_shard"
    assert rows[1].member == "png"
    assert "at byte 2560 in member 'b.png'" in rows[1].message


def test_read_shard_truncated_at_member_boundary_reports_sample_in_progress():
    data = _tar_bytes(THREE_SAMPLES)
    # After b.cls (header 4608, data 5120..5632) the stream just stops: c.png is lost and b
    # cannot be known to be complete.
    rows = _read_bytes(data[:5632])

    assert _keys(rows) == [("Sample", "a"), ("ErrorRow", "b")]
    assert rows[1].reason == "truncated_shard"
    assert "at byte 5632" in rows[1].message
    assert "end-of-archive" in rows[1].message


def test_read_shard_truncated_gzip():
    noise = random.Random(0).randbytes
    members = [(f"{key}.{ext}", noise(20_000)) for key in "abcd" for ext in ("png", "cls")]
    compressed = gzip.compress(_tar_bytes(members))

    rows = _read_bytes(compressed[: len(compressed) * 3 // 4])

    assert _keys(rows[:2]) == [("Sample", "a"), ("Sample", "b")]

    assert rows[-1].reason == "truncated_shard"
    assert sum(isinstance(row, ErrorRow) for row in rows) == 1
    assert all(isinstance(row, Sample) for row in rows[:-1])


def test_read_shard_garbled_header():
    data = bytearray(_tar_bytes(THREE_SAMPLES))
    data[4608:5120] = b"\xab" * 512  # the header of b.cls

    rows = _read_bytes(bytes(data))

    assert _keys(rows) == [("Sample", "a"), ("ErrorRow", "b")]
    assert "invalid tar header" in rows[1].message


def test_read_shard_complete_archive_has_no_error():
    rows = _read_bytes(_tar_bytes(THREE_SAMPLES))

    assert _keys(rows) == [("Sample", "a"), ("Sample", "b"), ("Sample", "c")]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 600, "bad checksum"),
        (b"\x1f\x8b", "EOFError"),
        (b"\x1f\x8bnot really gzip", "BadGzipFile"),
    ],
)
def test_read_shard_unreadable_file_is_one_error_row(tmp_path, data, message):
    path = _write(tmp_path / "bad.tar", data)

    rows = list(read_shard(path))

    assert len(rows) == 1
    assert (rows[0].shard, rows[0].key, rows[0].reason) == (path, None, "unreadable_shard")
    assert message in rows[0].message


def test_read_shard_empty_archive_has_no_rows():
    assert _read_bytes(_tar_bytes([])) == []


def test_read_shard_directory_is_error_row(tmp_path):
    rows = list(read_shard(str(tmp_path)))

    assert [row.reason for row in rows] == ["unreadable_shard"]


def test_read_shard_real_webdataset_sample():
    rows = list(read_shard(str(SAMPLE_SHARD)))

    assert len(rows) == 90
    assert all(isinstance(row, Sample) for row in rows)
    assert all(set(row.members) == {"png", "cls"} for row in rows)
    assert len({row.key for row in rows}) == 90


def test_expand_pattern_braces():
    assert expand_pattern("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_pattern("{a,b}/x.tar") == ["a/x.tar", "b/x.tar"]


def test_expand_pattern_rejects_empty():
    with pytest.raises(ValueError, match="pattern must be a non-empty string, got ''"):
        expand_pattern("")


def test_match_shards_braces_and_globs(tmp_path):
    for index in range(3):
        _write(tmp_path / f"s-{index:03d}.tar", b"")
    _write(tmp_path / "other.tar", b"")

    braces = match_shards(str(tmp_path / "s-{000..002}.tar"))
    glob = match_shards(str(tmp_path / "s-*.tar"))
    both = match_shards(str(tmp_path / "{s-00*,other}.tar"))
    overlapping = match_shards(str(tmp_path / "{s-000,s-00*}.tar"))

    assert [Path(path).name for path in braces] == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert glob == braces
    assert [Path(path).name for path in both] == [*map(lambda p: Path(p).name, braces), "other.tar"]
    assert overlapping == braces


def test_match_shards_missing_file_raises(tmp_path):
    _write(tmp_path / "s-000.tar", b"")

    with pytest.raises(ValueError, match=r"names 1 path\(s\) that match no file: .*s-001.tar"):
        match_shards(str(tmp_path / "s-{000..001}.tar"))


def test_read_image_shards_pipeline(tmp_path):
    _write(tmp_path / "s-000.tar", _tar_bytes(THREE_SAMPLES))
    _write(tmp_path / "s-001.tar", _tar_bytes([("d.png", b"4"), ("e.cls", b"5")]))
    pattern = str(tmp_path / "s-{000..001}.tar")

    pipeline = test_pipeline.TestPipeline(runner="FnApiRunner")
    rows = pipeline | ReadImageShards(pattern)
    keys = rows | beam.Map(lambda row: (type(row).__name__, Path(row.shard).name, row.key))
    assert_that(
        keys,
        equal_to(
            [
                ("Sample", "s-000.tar", "a"),
                ("Sample", "s-000.tar", "b"),
                ("Sample", "s-000.tar", "c"),
                ("Sample", "s-001.tar", "d"),
                ("ErrorRow", "s-001.tar", "e"),
            ]
        ),
    )
    result = pipeline.run()
    result.wait_until_finish()

    counters = result.metrics().query(MetricsFilter().with_namespace("pixeldensity"))["counters"]
    totals = {counter.key.metric.name: counter.committed for counter in counters}
    assert totals == {"shards_read": 2, "samples_read": 4, "read_errors": 1}


def test_read_image_shards_missing_pattern_fails_at_construction(tmp_path):
    pipeline = test_pipeline.TestPipeline(runner="FnApiRunner")

    with pytest.raises(ValueError, match="match no file"):
        _ = pipeline | ReadImageShards(str(tmp_path / "nothing-*.tar"))
