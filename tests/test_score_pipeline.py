"""End-to-end tests of pipelines.score on tiny shards written into tmp_path."""

import collections
import io
import logging
import tarfile
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image

import pixeldensity
from pipelines import score
from pixeldensity.calibration import fit_calibration
from pixeldensity.decoding import decode_image
from transforms.decode import decode_sample
from transforms.schema import SCHEMA_VERSION, SCORES_SCHEMA, STATUS_OK, error_row
from transforms.shards import match_shards, read_shard
from transforms.types import Decoded, ErrorRow, Sample
from transforms.write import WriteScores

IMAGE_SHAPE = (1, 28, 28)
RUNNER = "--runner=FnApiRunner"  # the DirectRunner would first try Prism (network)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _grey_images(num_images: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_images, 28, 28), dtype=np.uint8)
    images[:, :8] = 0
    return list(images)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _samples(prefix: str, images: list[np.ndarray]) -> list[tuple[str, bytes]]:
    members = []
    for index, image in enumerate(images):
        members += [(f"{prefix}{index:04d}.png", _png(image)), (f"{prefix}{index:04d}.cls", b"3")]
    return members


def _write_shards(directory: Path) -> dict[str, int]:
    """Writes shards with every kind of trouble; returns the rows expected per shard."""
    directory.mkdir(parents=True, exist_ok=True)
    good = _samples("good", _grey_images(6))
    (directory / "good.tar").write_bytes(_tar(good))

    rgb = np.random.default_rng(1).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    bad = _samples("bad", _grey_images(2, seed=2)) + [
        ("bad_garbage.png", b"not an image at all"),
        ("bad_rgb.png", _png(rgb)),  # converted to grey and resized: scored
        ("bad_label_only.cls", b"7"),  # no image member: missing_image
        ("bad_empty.png", b""),
    ]
    (directory / "bad.tar").write_bytes(_tar(bad))

    # Cut inside the image of the fourth sample: three samples survive, the fourth is an error.
    whole = _tar(_samples("cut", _grey_images(5, seed=3)))
    with tarfile.open(fileobj=io.BytesIO(whole)) as archive:
        cut_at = archive.getmember("cut0003.png").offset_data + 40
    (directory / "truncated.tar").write_bytes(whole[:cut_at])

    (directory / "zero_bytes.tar").write_bytes(b"")
    (directory / "no_samples.tar").write_bytes(_tar([]))
    return {"good.tar": 6, "bad.tar": 6, "truncated.tar": 4, "zero_bytes.tar": 1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("checkpoint")
    model = pixeldensity.create_model("pixelcnn_tiny")
    return str(pixeldensity.save_checkpoint(directory, model, image_shape=IMAGE_SHAPE))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    directory = tmp_path_factory.mktemp("shards")
    return directory, _write_shards(directory)


def _read(summary: score.ScoreSummary) -> list[dict]:
    rows = []
    for path in summary.output_files:
        rows += pq.read_table(path).to_pylist()
    return rows


def _run(checkpoint: str, input_pattern: str, output: Path, *extra: str) -> score.ScoreSummary:
    argv = ["--input", input_pattern, "--model", checkpoint, "--output", str(output / "scores")]
    return score.run([*argv, *extra, RUNNER])


def _bits_per_dim_by_key(rows: list[dict]) -> dict[str, float]:
    return {row["key"]: row["bits_per_dim"] for row in rows if row["status"] == STATUS_OK}


def test_parse_args_defaults_to_direct_runner_and_passes_beam_options():
    args, options = score.parse_args(
        ["--input", "s.tar", "--model", "m", "--output", "o", "--direct_num_workers", "2"]
    )

    assert options.view_as(StandardOptions).runner == score.DEFAULT_RUNNER
    assert options.view_as(DirectOptions).direct_num_workers == 2
    assert (args.alpha, args.batch_size, args.device) == (0.01, 64, "auto")


def test_parse_args_keeps_explicit_runner():
    _, options = score.parse_args(
        ["--input", "s", "--model", "m", "--output", "o", "--runner", "DataflowRunner"]
    )

    assert options.view_as(StandardOptions).runner == "DataflowRunner"


@pytest.mark.parametrize(
    ("beam_args", "expected"),
    [
        ([], None),
        (["--direct_num_workers=2", "--direct_running_mode=multi_processing"], 1),
        (["--direct_num_workers=2", "--direct_running_mode=multi_threading"], None),
    ],
)
def test_torch_threads_default_to_one_under_multi_processing(beam_args, expected):
    args, options = score.parse_args(["--input", "s", "--model", "m", "--output", "o", *beam_args])

    assert score.worker_torch_threads(args, options) == expected


def test_remote_runner_with_local_paths_warns(caplog):
    args, options = score.parse_args(
        ["--input", "gs://b/s-*.tar", "--model", "/ckpt", "--output", "gs://b/out"]
        + ["--runner=DataflowRunner"]
    )

    with caplog.at_level(logging.WARNING, logger="pipelines.score"):
        score._warn_about_local_paths(args, options)

    assert "--model /ckpt is a local path" in caplog.text
    assert "--input" not in caplog.text and "--output" not in caplog.text


def test_run_rejects_pattern_matching_nothing(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="match no file"):
        _run(checkpoint, str(tmp_path / "missing-*.tar"), tmp_path)


def test_run_rejects_likelihood_ratio_without_background(checkpoint, shards, tmp_path):
    directory, _ = shards

    pattern = str(directory / "good.tar")

    with pytest.raises(ValueError, match="needs --background-model"):
        _run(checkpoint, pattern, tmp_path, "--ood-score=likelihood_ratio_score")


def test_run_without_runner_never_tries_prism(checkpoint, tmp_path, caplog):
    (tmp_path / "one.tar").write_bytes(_tar(_samples("one", _grey_images(1))))
    argv = ["--input", str(tmp_path / "one.tar"), "--model", checkpoint]

    with caplog.at_level(logging.INFO):
        summary = score.run([*argv, "--output", str(tmp_path / "scores")])

    assert summary.rows == summary.scored == 1
    assert "prism" not in caplog.text.lower()


@pytest.mark.slow
def test_run_writes_one_row_per_sample_of_every_shard(checkpoint, shards, tmp_path):
    directory, expected_rows = shards

    summary = _run(checkpoint, str(directory / "*.tar"), tmp_path, "--batch-size=4")

    rows = _read(summary)
    rows_per_shard = collections.Counter(Path(row["shard"]).name for row in rows)
    assert rows_per_shard == expected_rows
    keys = [(row["shard"], row["key"]) for row in rows]
    assert len(keys) == len(set(keys))
    assert summary.rows == len(rows) == sum(expected_rows.values())
    assert summary.rows == summary.samples_read + summary.read_errors

    reasons = collections.Counter(row["error_reason"] for row in rows if row["status"] != "ok")
    assert reasons == {
        "unidentified_image": 1,
        "missing_image": 1,
        "empty_file": 1,
        "truncated_shard": 1,
        "unreadable_shard": 1,
    }
    assert summary.errors_by_reason == dict(reasons)
    assert summary.scored == len(rows) - 5 == 6 + 3 + 3
    assert summary.model_loads == 1
    for path in summary.output_files:
        assert pq.read_schema(path).equals(SCORES_SCHEMA, check_metadata=False)


@pytest.mark.slow
def test_bits_per_dim_equal_model_and_do_not_depend_on_batch_size(checkpoint, tmp_path):
    images = _grey_images(7, seed=5)
    members = _samples("img", images)
    (tmp_path / "shard.tar").write_bytes(_tar(members))
    model = pixeldensity.load_checkpoint(checkpoint).model
    decoded = np.stack(
        [decode_image(data, channels=1, size=(28, 28)).image for _, data in members[::2]]
    )
    with torch.no_grad():
        expected = model.bits_per_dim(torch.from_numpy(decoded)).numpy()
    pattern = str(tmp_path / "shard.tar")

    by_batch_size = {}
    for batch_size in (1, 3):
        output = tmp_path / f"batch{batch_size}"
        summary = _run(checkpoint, pattern, output, f"--batch-size={batch_size}")
        by_batch_size[batch_size] = _bits_per_dim_by_key(_read(summary))

    keys = [f"img{index:04d}" for index in range(7)]
    for values in by_batch_size.values():
        np.testing.assert_allclose([values[key] for key in keys], expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        [by_batch_size[1][key] for key in keys],
        [by_batch_size[3][key] for key in keys],
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.slow
def test_errors_only_output_has_the_identical_schema(checkpoint, shards, tmp_path):
    directory, _ = shards
    (tmp_path / "broken.tar").write_bytes(_tar([("x.png", b"junk"), ("y.jpg", b"")]))

    broken = _run(checkpoint, str(tmp_path / "broken.tar"), tmp_path / "broken")
    good = _run(checkpoint, str(directory / "good.tar"), tmp_path / "good")

    assert broken.rows == 2 and broken.scored == 0
    for path in broken.output_files + good.output_files:
        schema = pq.read_schema(path)
        assert schema.equals(SCORES_SCHEMA, check_metadata=False)
        assert schema.metadata[b"pixeldensity.schema_version"] == SCHEMA_VERSION.encode()
    broken_schema = pq.read_schema(broken.output_files[0])
    good_schema = pq.read_schema(good.output_files[0])
    assert broken_schema.equals(good_schema, check_metadata=False)
    assert broken_schema.metadata.keys() == good_schema.metadata.keys()


def _calibrated_checkpoint(directory: Path) -> str:
    """A checkpoint whose calibration makes every image an outlier and atypically simple."""
    torch.manual_seed(0)
    calibration = fit_calibration(
        np.linspace(-200.0, -100.0, 99),  # every real complexity score lies above these
        np.linspace(100.0, 200.0, 99),  # and every real bits/dim below these
        score_name="complexity_score",
        compressor="png",
        source="synthetic",
    )
    model = pixeldensity.create_model("pixelcnn_tiny")
    return str(
        pixeldensity.save_checkpoint(
            directory, model, image_shape=IMAGE_SHAPE, calibration=calibration.to_dict()
        )
    )


@pytest.mark.slow
def test_calibrated_checkpoint_flags_with_conformal_pvalues(shards, tmp_path):
    directory, _ = shards
    checkpoint = _calibrated_checkpoint(tmp_path / "calibrated")

    summary = _run(checkpoint, str(directory / "good.tar"), tmp_path, "--alpha=0.01")

    rows = _read(summary)
    assert len(rows) == summary.outliers == summary.atypically_simple == 6
    for row in rows:
        assert row["ood_score"] == pytest.approx(row["complexity_score"])
        assert row["ood_pvalue"] == pytest.approx(0.01)  # 1 / (n + 1), n = 99
        assert row["is_outlier"] and row["is_atypically_simple"]
    metadata = pq.read_schema(summary.output_files[0]).metadata
    assert metadata[b"pixeldensity.flags_from"] == b"calibration"
    assert metadata[b"pixeldensity.alpha"] == b"0.01"
    assert len(metadata[b"pixeldensity.calibration_id"]) == 12


@pytest.mark.slow
def test_threshold_flags_without_pvalues_and_background_gives_likelihood_ratio(
    checkpoint, shards, tmp_path
):
    directory, _ = shards
    torch.manual_seed(1)
    background = pixeldensity.save_checkpoint(
        tmp_path / "background",
        pixeldensity.create_model("pixelcnn_tiny"),
        image_shape=IMAGE_SHAPE,
        name="background",
    )
    pipeline = TestPipeline(argv=[RUNNER])
    argv = ["--input", str(directory / "good.tar"), "--model", checkpoint]
    argv += ["--output", str(tmp_path / "scores"), "--background-model", str(background)]

    summary = score.run([*argv, "--threshold=-1000"], pipeline=pipeline)

    rows = _read(summary)
    assert summary.outliers == len(rows) == 6
    for row in rows:
        expected = row["bits_per_dim"] - row["background_bits_per_dim"]
        assert row["likelihood_ratio_score"] == pytest.approx(expected)
        assert row["ood_score"] == row["likelihood_ratio_score"]
        assert row["ood_pvalue"] is None and row["is_atypically_simple"] is None
    metadata = pq.read_schema(summary.output_files[0]).metadata
    assert metadata[b"pixeldensity.ood_score_name"] == b"likelihood_ratio_score"
    assert metadata[b"pixeldensity.background_model_id"].startswith(b"background-")


def _reference_bits_per_dim(checkpoint: str, pattern: str) -> dict[str, float]:
    """Bits/dim of every decodable sample, computed outside Beam, by key."""
    model = pixeldensity.load_checkpoint(checkpoint).model
    decoded = [
        decode_sample(sample, channels=1, size=(28, 28))
        for path in match_shards(pattern)
        for sample in read_shard(path)
        if isinstance(sample, Sample)
    ]
    decoded = [element for element in decoded if isinstance(element, Decoded)]
    with torch.no_grad():
        images = torch.from_numpy(np.stack([element.image for element in decoded]))
        bits_per_dim = model.bits_per_dim(images).tolist()
    return {element.key: value for element, value in zip(decoded, bits_per_dim, strict=True)}


@pytest.mark.slow
def test_multi_processing_gives_the_same_rows(checkpoint, shards, tmp_path):
    directory, expected_rows = shards
    pattern = str(directory / "*.tar")

    summary = _run(
        checkpoint,
        pattern,
        tmp_path,
        "--batch-size=4",
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
    )

    rows = _read(summary)
    assert collections.Counter(Path(row["shard"]).name for row in rows) == expected_rows
    expected = _reference_bits_per_dim(checkpoint, pattern)
    scored = _bits_per_dim_by_key(rows)
    assert scored.keys() == expected.keys()
    for key, value in expected.items():
        assert scored[key] == pytest.approx(value, abs=1e-5)
    assert 1 <= summary.model_loads <= 2  # once per worker process that got work


def _error_rows(num_rows: int) -> list[dict]:
    return [
        error_row(ErrorRow("s.tar", f"{index:03d}", "png", "empty_file", "0 bytes"), model_id="m")
        for index in range(num_rows)
    ]


def test_write_scores_rejects_row_missing_a_column(tmp_path):
    rows = _error_rows(2)
    del rows[1]["ood_score"]
    pipeline = TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    _ = pipeline | beam.Create(rows) | WriteScores(str(tmp_path / "scores"))

    with pytest.raises(ValueError, match=r"missing \['ood_score'\], unexpected \[\]"):
        pipeline.run()


def test_write_scores_fixed_shards_all_carry_the_schema(tmp_path):
    pipeline = TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    metadata = {"model_id": "m"}
    _ = (
        pipeline
        | beam.Create(_error_rows(10))
        | WriteScores(str(tmp_path / "scores"), metadata=metadata, num_shards=3)
    )
    pipeline.run().wait_until_finish()

    paths = sorted(tmp_path.glob("scores-*-of-00003.parquet"))
    assert len(paths) == 3
    # Rows are dealt to files a whole bundle at a time, so most of the 3 files may be empty.
    assert sum(pq.read_metadata(path).num_rows for path in paths) == 10
    for path in paths:
        schema = pq.read_schema(path)
        assert schema.equals(SCORES_SCHEMA, check_metadata=False)
        assert schema.metadata[b"pixeldensity.model_id"] == b"m"


def test_mistyped_option_is_an_error_naming_the_closest_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        score.parse_args(["--input", "a", "--model", "b", "--output", "c", "--alpah", "0.2"])

    assert exit_info.value.code == 2
    assert "--alpah: did you mean --alpha" in capsys.readouterr().err


def test_main_turns_a_user_error_into_exit_status_2(capfd):
    status = score.main(["--input", "no/such/*.tar", "--model", "no_model", "--output", "x"])

    assert status == 2
    assert "no_model: checkpoint directory does not exist" in capfd.readouterr().err
