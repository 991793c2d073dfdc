"""Tests for transforms.schema: the one Parquet schema and the two row builders."""

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pixeldensity.decoding import DECODE_ERROR_REASONS
from pixeldensity.scores import (
    BACKGROUND_BITS_PER_DIM,
    BITS_PER_DIM,
    COMPLEXITY_BITS_PER_DIM,
    OOD_SCORE_NAMES,
)
from transforms.schema import (
    COLUMNS,
    ERROR_REASONS,
    FLAG_COLUMNS,
    REASON_INFERENCE_FAILED,
    SCHEMA_VERSION,
    SCORE_COLUMNS,
    SCORE_ERROR_REASONS,
    SCORES_SCHEMA,
    STATUS_ERROR,
    STATUS_OK,
    error_row,
    schema_with_metadata,
    score_row,
)
from transforms.score import ScoreError
from transforms.types import READ_ERROR_REASONS, Decoded, ErrorRow

OUTPUT_SCHEMA_DOC = Path(__file__).parents[1] / "docs" / "output_schema.md"

EXPECTED_COLUMNS = (
    "key",
    "shard",
    "member",
    "status",
    "error_reason",
    "error_message",
    "original_width",
    "original_height",
    "original_mode",
    "original_format",
    "is_animated",
    "num_frames",
    "bits_per_dim",
    "complexity_bits_per_dim",
    "complexity_score",
    "background_bits_per_dim",
    "likelihood_ratio_score",
    "ood_score",
    "ood_pvalue",
    "simplicity_pvalue",
    "is_outlier",
    "is_atypically_simple",
    "model_id",
)


def _decoded(key: str = "000001") -> Decoded:
    return Decoded(
        shard="/data/shard-000.tar",
        key=key,
        member="png",
        image=np.zeros((1, 28, 28), dtype=np.uint8),
        original_width=28,
        original_height=28,
        original_mode="L",
        original_format="PNG",
        is_animated=False,
        num_frames=1,
    )


def test_schema_columns_in_order():
    assert COLUMNS == EXPECTED_COLUMNS
    assert set(SCORE_COLUMNS) <= set(COLUMNS)
    assert set(FLAG_COLUMNS) <= set(SCORE_COLUMNS)


def test_schema_score_columns_use_the_names_of_pixeldensity_scores():
    # So that a score table read back can be fed to `ood_score_from_columns` as it is.
    for name in (BITS_PER_DIM, COMPLEXITY_BITS_PER_DIM, BACKGROUND_BITS_PER_DIM, *OOD_SCORE_NAMES):
        assert name in SCORE_COLUMNS


def test_schema_every_field_described_and_nullable_except_identity():
    required = {field.name for field in SCORES_SCHEMA if not field.nullable}
    assert required == {"shard", "status", "model_id"}
    for field in SCORES_SCHEMA:
        assert field.metadata[b"description"], field.name


def test_schema_score_columns_are_float64_or_bool():
    for name in SCORE_COLUMNS:
        assert SCORES_SCHEMA.field(name).type in (pa.float64(), pa.bool_()), name


def test_schema_version_is_major_minor():
    assert re.fullmatch(r"\d+\.\d+", SCHEMA_VERSION)


def test_error_reasons_cover_every_stage_once():
    assert len(set(ERROR_REASONS)) == len(ERROR_REASONS)
    for reason in READ_ERROR_REASONS + DECODE_ERROR_REASONS + SCORE_ERROR_REASONS:
        assert reason in ERROR_REASONS


def test_output_schema_doc_names_every_column_and_reason():
    text = OUTPUT_SCHEMA_DOC.read_text()
    for name in COLUMNS + ERROR_REASONS:
        assert f"`{name}`" in text, name
    assert f"schema version {SCHEMA_VERSION}" in text


def test_score_row_sets_every_column():
    row = score_row(
        _decoded(),
        {"bits_per_dim": np.float32(3.5), "complexity_bits_per_dim": 2.0, "is_outlier": np.True_},
        model_id="m-1",
    )

    assert tuple(row) == COLUMNS
    assert row["status"] == STATUS_OK
    assert row["error_reason"] is None and row["error_message"] is None
    assert row["bits_per_dim"] == 3.5 and type(row["bits_per_dim"]) is float
    assert row["is_outlier"] is True
    assert row["ood_pvalue"] is None and row["likelihood_ratio_score"] is None
    assert (row["original_width"], row["original_mode"], row["member"]) == (28, "L", "png")
    assert row["model_id"] == "m-1"


def test_score_row_rejects_unknown_column():
    with pytest.raises(ValueError, match=r"unknown columns \['bpd'\]"):
        score_row(_decoded(), {"bits_per_dim": 1.0, "bpd": 1.0}, model_id="m")


def test_score_row_requires_bits_per_dim():
    with pytest.raises(ValueError, match="must include a bits_per_dim"):
        score_row(_decoded(), {"complexity_bits_per_dim": 1.0}, model_id="m")


def test_score_row_rejects_non_finite_score():
    with pytest.raises(ValueError, match="score ood_score must be finite"):
        score_row(_decoded(), {"bits_per_dim": 1.0, "ood_score": float("nan")}, model_id="m")


def test_score_row_requires_model_id():
    with pytest.raises(ValueError, match="model_id must be a non-empty string"):
        score_row(_decoded(), {"bits_per_dim": 1.0}, model_id="")


def test_error_row_sets_every_column_to_null_but_identity():
    error = ErrorRow("/data/s.tar", "k", "jpg", "truncated", "image data ends early")

    row = error_row(error, model_id="m-1")

    assert tuple(row) == COLUMNS
    assert row["status"] == STATUS_ERROR
    assert (row["key"], row["shard"], row["member"]) == ("k", "/data/s.tar", "jpg")
    assert (row["error_reason"], row["error_message"]) == ("truncated", "image data ends early")
    assert row["model_id"] == "m-1"
    others = set(COLUMNS) - {"key", "shard", "member", "status", "error_reason"}
    assert all(row[name] is None for name in others - {"error_message", "model_id"})


def test_error_row_of_unreadable_shard_has_null_key():
    error = ErrorRow("/data/empty.tar", None, None, "unreadable_shard", "not a tar file")

    assert error_row(error, model_id="m")["key"] is None


def test_error_row_keeps_file_facts_of_score_errors():
    error = ScoreError.of(_decoded(), REASON_INFERENCE_FAILED, "RuntimeError: boom")

    row = error_row(error, model_id="m")

    assert (row["original_width"], row["original_format"], row["num_frames"]) == (28, "PNG", 1)
    assert row["bits_per_dim"] is None


def test_error_row_rejects_unknown_reason():
    error = ErrorRow("/data/s.tar", "k", None, "gremlins", "")

    with pytest.raises(ValueError, match="error reason must be one of .* got 'gremlins'"):
        error_row(error, model_id="m")


def test_schema_with_metadata_prefixes_keys_and_keeps_fields():
    schema = schema_with_metadata({"model_id": "m-1", "alpha": 0.01, "threshold": None})

    assert schema.equals(SCORES_SCHEMA, check_metadata=False)
    assert schema.metadata == {
        b"pixeldensity.schema_version": SCHEMA_VERSION.encode(),
        b"pixeldensity.model_id": b"m-1",
        b"pixeldensity.alpha": b"0.01",
        b"pixeldensity.threshold": b"",
    }


def test_rows_round_trip_through_parquet(tmp_path):
    rows = [
        score_row(_decoded("a"), {"bits_per_dim": 2.5, "ood_score": 0.5}, model_id="m"),
        error_row(ErrorRow("/data/s.tar", "b", "png", "empty_file", "0 bytes"), model_id="m"),
    ]
    path = tmp_path / "rows.parquet"

    pq.write_table(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), path)

    table = pq.read_table(path)
    assert table.schema.equals(SCORES_SCHEMA)
    assert table.to_pylist() == rows
