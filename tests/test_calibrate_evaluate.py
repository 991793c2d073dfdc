"""The calibration and evaluation pipelines, end to end on tiny shards of real images."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pixeldensity
from pipelines import calibrate, evaluate, score

pytestmark = pytest.mark.slow


@pytest.fixture
def checkpoint(tmp_path) -> str:
    model = pixeldensity.create_model("pixelcnn_tiny")
    directory = tmp_path / "checkpoint"
    pixeldensity.save_checkpoint(directory, model, image_shape=(1, 28, 28), name="tiny")
    return str(directory)


@pytest.fixture
def noise_shard(tmp_path) -> str:
    """One shard of 32 uniform-noise PNGs: far out of any distribution."""
    import io

    import webdataset
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / "noise-000000.tar"
    with webdataset.TarWriter(str(path), encoder=False) as writer:
        for index in range(32):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
            writer.write({"__key__": f"noise{index:03d}", "png": buffer.getvalue()})
    return str(path)


def _score_at_alpha_0_1(pattern: str, checkpoint: str, tmp_path) -> score.ScoreSummary:
    """Scores `pattern` at alpha 0.1: the 48-image calibrations here cannot flag at 0.01."""
    argv = ["--input", pattern, "--model", checkpoint, "--output", str(tmp_path / "scores")]
    return score.run([*argv, "--alpha", "0.1"])


def test_calibrate_stores_every_held_out_score_in_the_checkpoint(checkpoint, fashion_shards):
    pattern = fashion_shards[0].replace("000000", "00000[0-2]")

    calibration = calibrate.run(["--input", pattern, "--model", checkpoint])

    stored = pixeldensity.load_checkpoint(checkpoint).calibration
    assert calibration.num_scores == 48
    assert stored["num_scores"] == 48
    assert stored["score_name"] == "complexity_score"
    assert stored["compressor"] == calibration.compressor


def test_scoring_after_calibration_writes_pvalues_and_flags(
    checkpoint, fashion_shards, noise_shard, tmp_path
):
    calibrate.run(
        ["--input", fashion_shards[0].replace("000000", "00000[0-2]"), "--model", checkpoint]
    )

    summary = _score_at_alpha_0_1(noise_shard, checkpoint, tmp_path)

    table = pa.concat_tables(pq.read_table(path) for path in summary.output_files)
    pvalues = np.array(table["ood_pvalue"].to_pylist())
    assert table.num_rows == 32
    assert np.all((pvalues > 0) & (pvalues <= 1))
    assert all(flag is not None for flag in table["is_outlier"].to_pylist())


def test_calibrate_refuses_too_few_held_out_images(checkpoint, fashion_shards):
    with pytest.raises(ValueError, match="at least 20 calibration scores, got 16"):
        calibrate.run(["--input", fashion_shards[0], "--model", checkpoint])


def test_evaluate_reports_every_score_and_writes_json(
    checkpoint, fashion_shards, noise_shard, tmp_path
):
    report_path = tmp_path / "report.json"

    report = evaluate.run(
        [
            "--in-dist",
            fashion_shards[3],
            "--ood",
            noise_shard,
            "--model",
            checkpoint,
            "--output-json",
            str(report_path),
        ]
    )

    by_score = {row["score"]: row for row in report["metrics"]}
    assert set(by_score) == {"bits_per_dim", "complexity_score", "ood_score"}
    assert by_score["bits_per_dim"]["num_in"] == 16
    assert by_score["bits_per_dim"]["num_out"] == 32
    assert 0.0 <= by_score["complexity_score"]["auroc"] <= 1.0
    assert json.loads(report_path.read_text())["metrics"] == report["metrics"]


def test_recalibrating_with_another_compressor_replaces_the_old_calibration(
    checkpoint, fashion_shards, noise_shard, tmp_path
):
    pattern = fashion_shards[0].replace("000000", "00000[0-2]")
    calibrate.run(["--input", pattern, "--model", checkpoint])

    calibration = calibrate.run(["--input", pattern, "--model", checkpoint, "--compressor", "lzma"])
    summary = _score_at_alpha_0_1(noise_shard, checkpoint, tmp_path)

    metadata = pq.read_schema(summary.output_files[0]).metadata
    assert calibration.compressor == "lzma"
    assert metadata[b"pixeldensity.compressor"] == b"lzma"
