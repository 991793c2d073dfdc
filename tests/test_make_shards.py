"""Tests of pipelines.sources and pipelines.make_shards: real images in, identical pixels out."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipelines import cli, make_shards, shard_data, sources


def read_shards(shards: list[str]) -> list[tuple[str, np.ndarray, dict]]:
    """(key, (C, H, W) pixels, metadata) of every sample, in stored order."""
    samples = []
    for shard in shards:
        for sample in shard_data.iter_shard(shard):
            pixels = shard_data.decode_sample(sample, channels=1, size=(28, 28))
            samples.append((sample.key, pixels, json.loads(sample.members["json"])))
    return samples


def png_bytes(pixels: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def test_make_shards_idx_round_trip_pixels_identical(fashion_shards, fashion_idx_paths):
    images = sources.read_idx(fashion_idx_paths[0])
    labels = sources.read_idx(fashion_idx_paths[1])

    samples = read_shards(fashion_shards)

    assert [shard.rsplit("/", 1)[1] for shard in fashion_shards] == [
        f"fashion-{index:06d}.tar" for index in range(4)
    ]
    assert len(samples) == 64
    for index, (key, pixels, metadata) in enumerate(samples):
        assert key == f"{index:06d}"
        np.testing.assert_array_equal(pixels[0], images[index])
        assert metadata["label"] == labels[index]
        assert metadata["index"] == index
        assert metadata["original_width"] == metadata["original_height"] == 28


def test_make_shards_members_are_png_and_json(fashion_shards):
    with tarfile.open(fashion_shards[0]) as archive:
        names = archive.getnames()
    assert names[:2] == ["000000.json", "000000.png"]
    assert len(names) == 32


def test_make_shards_start_and_limit_select_a_range(tmp_path, fashion_idx_paths):
    source = make_shards.open_source(str(fashion_idx_paths[0]))
    train = make_shards.run(source, str(tmp_path / "train"), start=0, limit=50)
    val = make_shards.run(source, str(tmp_path / "val"), start=50)

    train_keys = [key for key, _, _ in read_shards(train.shards)]
    val_keys = [key for key, _, _ in read_shards(val.shards)]
    assert (train.num_samples, val.num_samples) == (50, 14)
    assert val_keys == [f"{index:06d}" for index in range(50, 64)]
    assert not set(train_keys) & set(val_keys)


def test_make_shards_shuffle_seed_is_deterministic(tmp_path, fashion_idx_paths):
    source = make_shards.open_source(str(fashion_idx_paths[0]))
    first = make_shards.run(source, str(tmp_path / "a"), shuffle_seed=3, limit=20)
    second = make_shards.run(source, str(tmp_path / "b"), shuffle_seed=3, limit=20)

    keys = [key for key, _, _ in read_shards(first.shards)]
    assert keys == [key for key, _, _ in read_shards(second.shards)]
    assert keys != sorted(keys)
    with open(first.shards[0], "rb") as a, open(second.shards[0], "rb") as b:
        assert a.read() == b.read()  # byte-identical shards


def test_make_shards_empty_selection_is_an_error(tmp_path, fashion_idx_paths):
    source = make_shards.open_source(str(fashion_idx_paths[0]))
    with pytest.raises(ValueError, match="nothing to write"):
        make_shards.run(source, str(tmp_path / "x"), start=64)
    with pytest.raises(ValueError, match="start must be in 0..64"):
        make_shards.run(source, str(tmp_path / "x"), start=65)


def test_read_idx_reads_plain_and_rejects_non_idx(tmp_path, fashion_idx_paths):
    plain = tmp_path / "images-idx3-ubyte"
    plain.write_bytes(gzip.decompress(fashion_idx_paths[0].read_bytes()))
    np.testing.assert_array_equal(sources.read_idx(plain), sources.read_idx(fashion_idx_paths[0]))

    truncated = tmp_path / "truncated-idx3-ubyte"
    truncated.write_bytes(plain.read_bytes()[:-10])
    with pytest.raises(ValueError, match="declares shape"):
        sources.read_idx(truncated)
    with pytest.raises(ValueError, match="not an IDX file"):
        sources.read_idx(fashion_idx_paths[0].parent / "README.md")


@pytest.fixture
def image_folder(tmp_path, fashion_idx_paths):
    """A class-per-folder tree: 3 PNG 'shirt' images, 2 'boot' ones (one a JPEG), 1 bad file."""
    images = sources.read_idx(fashion_idx_paths[0])
    root = tmp_path / "images"
    for name, index, image_format in [
        ("shirt/a.png", 0, "PNG"),
        ("shirt/b.png", 1, "PNG"),
        ("shirt/sub/c.png", 2, "PNG"),
        ("boot/d.png", 3, "PNG"),
        ("boot/e.jpg", 4, "JPEG"),
    ]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(images[index], image_format))
    (root / "boot" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root, images


def test_make_shards_folder_labels_from_folders_and_skips_bad_files(tmp_path, image_folder):
    root, images = image_folder
    source = make_shards.open_source(str(root), labels_from_folders=True)
    summary = make_shards.run(source, str(tmp_path / "out" / "folder"))

    samples = read_shards(summary.shards)
    assert (summary.num_samples, summary.num_skipped) == (5, 1)
    assert summary.skipped_reasons == {"unidentified_image": 1}
    by_source = {metadata["source"]: (pixels, metadata) for _, pixels, metadata in samples}
    assert sorted(by_source) == [
        "boot/d.png",
        "boot/e.jpg",
        "shirt/a.png",
        "shirt/b.png",
        "shirt/sub/c.png",
    ]
    assert by_source["boot/d.png"][1]["label"] == 0
    assert by_source["shirt/sub/c.png"][1]["class_name"] == "shirt"
    assert by_source["shirt/sub/c.png"][1]["label"] == 1
    np.testing.assert_array_equal(by_source["shirt/a.png"][0][0], images[0])
    assert by_source["boot/e.jpg"][1]["original_format"] == "JPEG"


def test_make_shards_zip_include_and_parent_folder_labels(tmp_path, fashion_idx_paths):
    images = sources.read_idx(fashion_idx_paths[0])
    archive_path = tmp_path / "images.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        for split in ("train", "test"):
            for class_index, name in enumerate(("coat", "bag")):
                data = png_bytes(images[class_index])
                archive.writestr(f"{split}/{name}/{class_index:04d}.png", data)

    source = make_shards.open_source(str(archive_path), labels_from_folders=True, include="test/*")
    summary = make_shards.run(source, str(tmp_path / "zip"))

    samples = read_shards(summary.shards)
    assert [metadata["source"] for _, _, metadata in samples] == [
        "test/bag/0001.png",
        "test/coat/0000.png",
    ]
    assert [metadata["label"] for _, _, metadata in samples] == [0, 1]
    np.testing.assert_array_equal(samples[1][1][0], images[0])


def test_make_shards_npz_keys_and_channels_last_rgb(tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "arrays.npz", train_images=colour, train_labels=np.arange(5))

    source = make_shards.open_source(
        str(tmp_path / "arrays.npz"), images_key="train_images", labels_key="train_labels"
    )
    summary = make_shards.run(source, str(tmp_path / "npz"), samples_per_shard=2)

    assert len(summary.shards) == 3
    sample = next(shard_data.iter_shard(summary.shards[1]))
    pixels = shard_data.decode_sample(sample, channels=3, size=(8, 6))
    np.testing.assert_array_equal(pixels, colour[2].transpose(2, 0, 1))
    assert json.loads(sample.members["json"])["label"] == 2
    with pytest.raises(ValueError, match=r"no array named 'images'.*train_images"):
        make_shards.open_source(str(tmp_path / "arrays.npz"))


def test_make_shards_size_and_channels_apply_the_decode_policy(tmp_path, fashion_idx_paths):
    source = make_shards.open_source(str(fashion_idx_paths[0]))
    summary = make_shards.run(source, str(tmp_path / "rgb"), limit=2, channels=3, size=(32, 32))

    sample = next(shard_data.iter_shard(summary.shards[0]))
    pixels = shard_data.decode_sample(sample, channels=3, size=(32, 32))
    assert pixels.shape == (3, 32, 32)
    np.testing.assert_array_equal(pixels[0], pixels[2])


def test_cli_make_shards_subcommand_writes_and_counts(tmp_path, fashion_idx_paths, caplog):
    caplog.set_level("INFO")
    status = cli.main(
        [
            "make-shards",
            str(fashion_idx_paths[0]),
            str(tmp_path / "cli" / "fashion"),
            "--labels",
            str(fashion_idx_paths[1]),
            "--samples-per-shard",
            "40",
            "--limit",
            "50",
        ]
    )

    assert status == 0
    assert sorted(path.name for path in (tmp_path / "cli").iterdir()) == [
        "fashion-000000.tar",
        "fashion-000001.tar",
    ]
    assert "wrote 50 samples in 2 shards" in caplog.text


def test_cli_unknown_and_missing_subcommands(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_raw_shards_keep_files_unchanged_even_when_they_do_not_decode(tmp_path):
    import tarfile

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "notes.jpg").write_bytes(b"not an image")
    (folder / "tiny.png").write_bytes(_png_file_bytes())

    source = make_shards.open_source(str(folder))
    summary = make_shards.run(source, str(tmp_path / "raw"), raw=True)

    with tarfile.open(summary.shards[0]) as tar:
        members = {member.name: tar.extractfile(member).read() for member in tar}
    assert summary.num_samples == 2
    assert members["000000.jpg"] == b"not an image"
    assert members["000001.png"] == (folder / "tiny.png").read_bytes()


def _png_file_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (4, 4), 7).save(buffer, format="PNG")
    return buffer.getvalue()
