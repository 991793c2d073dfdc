"""The one Parquet schema of score tables, and the only two functions that build its rows.

Every writer of scores imports `SCORES_SCHEMA`, and every row is built by `score_row` or
`error_row`, which set every column explicitly: Beam's `WriteToParquet` turns a missing nullable
field into null without a word, so a misspelt or forgotten column would otherwise vanish into
nulls instead of failing.

One row per sample read: `status` is "ok" with scores, or "error" with `error_reason` (one of
`ERROR_REASONS`) and `error_message`. Score and flag columns are null on error rows, and flag
columns are null when no calibration or threshold was given. `key`, `shard` and `member` join
a row back to its WebDataset sample. `docs/output_schema.md` is the reader's version of this
module; keep the two in step, and bump `SCHEMA_VERSION` when a column changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from pixeldensity.decoding import DECODE_ERROR_REASONS
from transforms.types import FILE_FACTS, READ_ERROR_REASONS, ErrorRow

__all__ = [
    "COLUMNS",
    "ERROR_REASONS",
    "FLAG_COLUMNS",
    "METADATA_PREFIX",
    "REASON_INFERENCE_FAILED",
    "REASON_NON_FINITE_SCORE",
    "REASON_SHAPE_MISMATCH",
    "REASON_VALUE_OUT_OF_RANGE",
    "SCHEMA_VERSION",
    "SCORES_SCHEMA",
    "SCORE_COLUMNS",
    "SCORE_ERROR_REASONS",
    "STATUS_ERROR",
    "STATUS_OK",
    "error_row",
    "schema_with_metadata",
    "score_row",
]

# Major.minor: the major part changes when a column is removed, renamed or retyped; the minor
# part when one is added. Readers should check the major part.
SCHEMA_VERSION = "1.0"

STATUS_OK = "ok"
STATUS_ERROR = "error"

# Error reasons of the scoring stage, after the read and decode reasons.
REASON_SHAPE_MISMATCH = "shape_mismatch"
REASON_VALUE_OUT_OF_RANGE = "value_out_of_range"
REASON_INFERENCE_FAILED = "inference_failed"
REASON_NON_FINITE_SCORE = "non_finite_score"
SCORE_ERROR_REASONS = (
    REASON_SHAPE_MISMATCH,
    REASON_VALUE_OUT_OF_RANGE,
    REASON_INFERENCE_FAILED,
    REASON_NON_FINITE_SCORE,
)

# Every value `error_reason` can take, by stage: read, decode, score.
ERROR_REASONS = READ_ERROR_REASONS + DECODE_ERROR_REASONS + SCORE_ERROR_REASONS

# Keys of the Parquet file metadata this project writes start with this prefix.
METADATA_PREFIX = "pixeldensity."


def _field(name: str, type_: pa.DataType, description: str, *, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


SCORES_SCHEMA = pa.schema(
    [
        _field("key", pa.string(), "WebDataset sample key; null only for an unreadable shard."),
        _field("shard", pa.string(), "Path or URL of the shard, as matched.", nullable=False),
        _field("member", pa.string(), "Extension of the image member scored, e.g. 'png'."),
        _field("status", pa.string(), "'ok' (scored) or 'error'.", nullable=False),
        _field("error_reason", pa.string(), "Machine-readable error code; null when ok."),
        _field("error_message", pa.string(), "Human-readable error description; null when ok."),
        _field("original_width", pa.int32(), "Width of the file as stored, pixels."),
        _field("original_height", pa.int32(), "Height of the file as stored, pixels."),
        _field("original_mode", pa.string(), "Pillow mode of the file, e.g. 'L', 'RGB', 'P'."),
        _field("original_format", pa.string(), "Pillow format of the file, e.g. 'PNG'."),
        _field("is_animated", pa.bool_(), "Whether the file holds more than one frame."),
        _field("num_frames", pa.int32(), "Frames in the file; the first one was scored."),
        _field("bits_per_dim", pa.float64(), "Model NLL / (C*H*W*ln 2), bits per sub-pixel."),
        _field(
            "complexity_bits_per_dim",
            pa.float64(),
            "Lossless compressor code length of the scored tensor, bits per sub-pixel.",
        ),
        _field(
            "complexity_score",
            pa.float64(),
            "bits_per_dim - complexity_bits_per_dim (Serra et al. 2020); higher is more OOD.",
        ),
        _field(
            "background_bits_per_dim",
            pa.float64(),
            "Bits/dim under the background model; null without one.",
        ),
        _field(
            "likelihood_ratio_score",
            pa.float64(),
            "bits_per_dim - background_bits_per_dim (Ren et al. 2019); null without background.",
        ),
        _field(
            "ood_score",
            pa.float64(),
            "The score flagged on, bits/dim; its name is in the file metadata.",
        ),
        _field("ood_pvalue", pa.float64(), "Conformal upper-tail p-value of ood_score."),
        _field("simplicity_pvalue", pa.float64(), "Conformal lower-tail p-value of bits_per_dim."),
        _field("is_outlier", pa.bool_(), "ood_pvalue <= alpha, or ood_score > threshold."),
        _field("is_atypically_simple", pa.bool_(), "simplicity_pvalue <= alpha."),
        _field("model_id", pa.string(), "Id of the checkpoint that scored.", nullable=False),
    ]
)

COLUMNS = tuple(SCORES_SCHEMA.names)

# Columns computed by scoring and flagging; null on error rows.
SCORE_COLUMNS = (
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
)
FLAG_COLUMNS = ("ood_pvalue", "simplicity_pvalue", "is_outlier", "is_atypically_simple")

# What the image file said about itself; copied from `Decoded` (and from scoring errors).
_FILE_COLUMNS = FILE_FACTS
_FLOAT_COLUMNS = frozenset(
    name for name in SCORE_COLUMNS if SCORES_SCHEMA.field(name).type == pa.float64()
)
_BOOL_COLUMNS = frozenset(
    name for name in SCORE_COLUMNS if SCORES_SCHEMA.field(name).type == pa.bool_()
)


def schema_with_metadata(metadata: Mapping[str, Any]) -> pa.Schema:
    """Returns `SCORES_SCHEMA` carrying file metadata (Parquet key-value metadata).

    Keys are prefixed with `METADATA_PREFIX` unless they already carry it; values are written
    as strings (None as the empty string). The schema version is always included.

    Args:
        metadata: e.g. {"model_id": ..., "alpha": 0.01}.

    Returns:
        The schema with the same fields and the metadata attached.
    """
    entries = {f"{METADATA_PREFIX}schema_version": SCHEMA_VERSION}
    for name, value in metadata.items():
        full_name = name if name.startswith(METADATA_PREFIX) else METADATA_PREFIX + name
        entries[full_name] = "" if value is None else str(value)
    return SCORES_SCHEMA.with_metadata(entries)


def _require_text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _score_value(name: str, value: Any) -> float | bool | None:
    """Converts one score to a Python float or bool (numpy scalars included); None stays None."""
    if value is None:
        return None
    if name in _BOOL_COLUMNS:
        return bool(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"score {name} must be finite or None, got {number}")
    return number


def score_row(sample: Any, scores: Mapping[str, Any], *, model_id: str) -> dict[str, Any]:
    """Builds the full row of a scored sample, every column set.

    Args:
        sample: the sample's identity and file facts: any object with the attributes `shard`,
            `key`, `member`, `original_width`, `original_height`, `original_mode`,
            `original_format`, `is_animated` and `num_frames` (`transforms.types.Decoded`,
            `transforms.score.Scored`).
        scores: values for some of `SCORE_COLUMNS` (bits/dim floats, p-values, bools); the
            columns not given are set to None. `bits_per_dim` is required.
        model_id: id of the scoring checkpoint.

    Returns:
        A dict with exactly the keys `COLUMNS`, status "ok".

    Raises:
        ValueError: if `scores` names a column outside `SCORE_COLUMNS`, lacks `bits_per_dim`,
            or holds a NaN or infinite score.
    """
    unknown = sorted(set(scores) - set(SCORE_COLUMNS))
    if unknown:
        raise ValueError(f"scores has unknown columns {unknown}; accepted: {list(SCORE_COLUMNS)}")
    if scores.get("bits_per_dim") is None:
        raise ValueError(f"scores must include a bits_per_dim value, got {dict(scores)!r}")

    row: dict[str, Any] = {
        "key": _require_text(sample.key, "key"),
        "shard": _require_text(sample.shard, "shard"),
        "status": STATUS_OK,
        "error_reason": None,
        "error_message": None,
        "model_id": _require_text(model_id, "model_id"),
    }
    for name in ("member", *_FILE_COLUMNS):
        row[name] = getattr(sample, name)
    for name in SCORE_COLUMNS:
        row[name] = _score_value(name, scores.get(name))
    return {name: row[name] for name in COLUMNS}


def error_row(error: ErrorRow, *, model_id: str) -> dict[str, Any]:
    """Builds the full row of a sample (or shard) that failed, every column set.

    Args:
        error: the error from reading, decoding or scoring.
        model_id: id of the scoring checkpoint, recorded on every row of a run.

    Returns:
        A dict with exactly the keys `COLUMNS`: status "error", the reason and message,
        `key`/`shard`/`member` from the error, the file facts (`original_width` ...
        `num_frames`) where the error object carries them (errors of the scoring stage do),
        everything else None.

    Raises:
        ValueError: if the reason is not one of `ERROR_REASONS` or the shard is empty.
    """
    if error.reason not in ERROR_REASONS:
        raise ValueError(f"error reason must be one of {ERROR_REASONS}, got {error.reason!r}")

    row = dict.fromkeys(COLUMNS)
    row.update(
        key=error.key,
        shard=_require_text(error.shard, "shard"),
        member=error.member,
        status=STATUS_ERROR,
        error_reason=error.reason,
        error_message=error.message,
        model_id=_require_text(model_id, "model_id"),
    )
    for name in _FILE_COLUMNS:
        row[name] = getattr(error, name, None)
    return row
