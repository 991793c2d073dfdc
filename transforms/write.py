"""Write score rows to Parquet: the `WriteScores` transform.

Every file gets the same schema, `transforms.schema.SCORES_SCHEMA`, carrying the run's file
metadata (model id, calibration identity, alpha, compressor, schema version), whatever rows it
holds: a file of error rows only, or no rows at all, reads back with every column typed.

Rows are checked on the way in: a row whose keys differ from the schema's columns fails the
job, because Beam's `WriteToParquet` would otherwise write a missing field as null silently.

File count (`num_shards`): `WriteToParquet` first packs the rows of each bundle into Arrow
tables (one per bundle, or per `row_group_bytes` of rows) and then deals whole tables to files.
With `num_shards=0` (the default) the runner decides: about one file per bundle of the final
stage. With `num_shards=N` there are exactly N files, but rows are balanced only table by
table: 1,000 rows in one bundle land in one file and the other N-1 files hold zero rows (with
the full schema). Lower `row_group_bytes` to spread a small output over fixed shards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import apache_beam as beam
from apache_beam.io.parquetio import WriteToParquet
from apache_beam.metrics import Metrics

from transforms.schema import COLUMNS, STATUS_OK, schema_with_metadata
from transforms.types import METRICS_NAMESPACE

__all__ = ["DEFAULT_ROW_GROUP_BYTES", "PARQUET_SUFFIX", "WriteScores"]

PARQUET_SUFFIX = ".parquet"

# In-memory (uncompressed) bytes of rows buffered per Arrow table, and so per row group.
DEFAULT_ROW_GROUP_BYTES = 64 * 1024 * 1024

_COLUMN_SET = frozenset(COLUMNS)


class _CheckAndCountFn(beam.DoFn):
    """Passes complete rows through, counting rows, statuses, reasons and flags."""

    def __init__(self):
        self._rows = Metrics.counter(METRICS_NAMESPACE, "rows")
        self._scored = Metrics.counter(METRICS_NAMESPACE, "scored")
        self._outliers = Metrics.counter(METRICS_NAMESPACE, "outliers")
        self._simple = Metrics.counter(METRICS_NAMESPACE, "atypically_simple")
        self._error_counters = {}

    def process(self, row: dict[str, Any]):
        if row.keys() != _COLUMN_SET:
            missing = sorted(_COLUMN_SET - row.keys())
            unexpected = sorted(row.keys() - _COLUMN_SET)
            raise ValueError(
                f"row must have exactly the schema's columns; missing {missing}, unexpected "
                f"{unexpected} (build rows with transforms.schema.score_row or error_row)"
            )

        self._rows.inc()
        if row["status"] == STATUS_OK:
            self._scored.inc()
        else:
            self._count_error(row["error_reason"])
        if row["is_outlier"]:
            self._outliers.inc()
        if row["is_atypically_simple"]:
            self._simple.inc()
        yield row

    def _count_error(self, reason: str) -> None:
        if reason not in self._error_counters:
            name = f"errors_{reason}"
            self._error_counters[reason] = Metrics.counter(METRICS_NAMESPACE, name)
        self._error_counters[reason].inc()


class WriteScores(beam.PTransform):
    """Writes full score rows to Parquet files named `<output_prefix>-SSSSS-of-NNNNN.parquet`.

    Input: a PCollection of row dicts built by `transforms.schema.score_row` / `error_row`.
    Output: Beam's write result, a PCollection of the file names written.

    Counters (namespace "pixeldensity"): `rows`, `scored`, `errors_<reason>`, `outliers`,
    `atypically_simple`, counted on the rows written.
    """

    def __init__(
        self,
        output_prefix: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        num_shards: int = 0,
        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
        codec: str = "snappy",
    ):
        """Creates the transform.

        Args:
            output_prefix: Path or URL prefix of the files, e.g. "gs://bucket/scores/run1".
            metadata: File metadata, e.g. {"model_id": ..., "alpha": 0.01}; keys get the
                "pixeldensity." prefix and values become strings. The schema version is added.
            num_shards: Number of files; 0 lets the runner decide (see the module docstring).
            row_group_bytes: Uncompressed bytes of rows per Arrow table and row group.
            codec: Parquet compression codec ("snappy", "zstd", "gzip", "none").

        Raises:
            ValueError: `output_prefix` is empty, or `num_shards` or `row_group_bytes` is
                out of range.
        """
        super().__init__()
        if not isinstance(output_prefix, str) or not output_prefix:
            raise ValueError(f"output_prefix must be a non-empty string, got {output_prefix!r}")
        if num_shards < 0:
            raise ValueError(f"num_shards must be 0 (runner decides) or more, got {num_shards}")
        if row_group_bytes < 1:
            raise ValueError(f"row_group_bytes must be at least 1, got {row_group_bytes}")
        self.schema = schema_with_metadata(metadata or {})
        self._output_prefix = output_prefix
        self._num_shards = num_shards
        self._row_group_bytes = row_group_bytes
        self._codec = codec

    def expand(self, rows):
        """Checks and counts the rows, then writes them."""
        return (
            rows
            | "CheckAndCount" >> beam.ParDo(_CheckAndCountFn())
            | "WriteParquet"
            >> WriteToParquet(
                self._output_prefix,
                self.schema,
                row_group_buffer_size=self._row_group_bytes,
                codec=self._codec,
                file_name_suffix=PARQUET_SUFFIX,
                num_shards=self._num_shards,
            )
        )
