"""Run the scoring pipeline over a shard pattern and read its Parquet rows back.

Calibration and evaluation score held-out shards with exactly the code the scoring job uses
(`pipelines.score`), then work on the resulting table. The sets they score are small (thousands
of images), so the rows are read into memory here; the scoring itself runs on whatever Beam
runner the options name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import score

logger = logging.getLogger(__name__)


def score_to_table(
    pattern: str,
    model: str,
    output_prefix: str,
    extra_argv: Sequence[str] = (),
) -> pa.Table:
    """Scores the shards matching `pattern` with `model`; returns every output row.

    Args:
        pattern: shard pattern (braces and globs).
        model: checkpoint directory.
        output_prefix: where the Parquet files go (kept, so that a run can be inspected).
        extra_argv: further `pipelines.score` arguments and Beam options.

    Returns:
        The rows of all the Parquet files the run wrote, errors included.
    """
    argv = ["--input", pattern, "--model", model, "--output", output_prefix, *extra_argv]
    summary = score.run(argv)
    return pa.concat_tables(pq.read_table(path) for path in summary.output_files)


def scored_rows(table: pa.Table) -> pa.Table:
    """Returns the rows of `table` with status "ok"; raises ValueError if there are none."""
    scored = table.filter(pc.equal(table["status"], "ok"))
    if scored.num_rows == 0:
        raise ValueError(f"none of the {table.num_rows} rows was scored; see their error_reason")
    return scored


def column_array(table: pa.Table, name: str) -> np.ndarray:
    """Returns column `name` as a float64 numpy array (nulls become NaN)."""
    return table[name].to_numpy(zero_copy_only=False).astype(np.float64)
