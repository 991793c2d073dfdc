"""Measure how well each outlier score separates in-distribution from out-of-distribution shards.

    python -m pipelines.evaluate --in-dist "runs/shards/fashion_test-0000[5-9].tar" \\
        --ood "runs/shards/mnist_test-*.tar" \\
        --model pixeldensity/pretrained/fashion_mnist_pixelcnn \\
        [--background-model CKPT] [--output-json report.json] [BEAM OPTIONS]

Both sets are scored by the scoring pipeline itself. For every score column (raw bits/dim, the
complexity-corrected score, the likelihood ratio when a background model is given, and the
calibrated ood_score) it reports AUROC, AUPRC and the false-positive rate at 95% true-positive
rate, out-of-distribution counted as positive and a higher score as more out-of-distribution;
then the flag rates of both sets. The in-distribution set must not overlap the calibration set.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.options import exit_on_user_error, quiet_beam_logging
from pipelines.score_tables import column_array, score_to_table, scored_rows
from pixeldensity.metrics import evaluate_scores, format_table

logger = logging.getLogger(__name__)

SCORE_COLUMNS = ("bits_per_dim", "complexity_score", "likelihood_ratio_score", "ood_score")
FLAG_COLUMNS = ("is_outlier", "is_atypically_simple")


def build_parser() -> argparse.ArgumentParser:
    """Returns the parser of the pipeline's own arguments (Beam's are passed through)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.evaluate",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
    )
    parser.add_argument("--in-dist", required=True, help="in-distribution shard pattern")
    parser.add_argument("--ood", required=True, help="out-of-distribution shard pattern")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--background-model", default=None, help="background checkpoint (LLR)")
    parser.add_argument(
        "--alpha", type=float, default=0.01, help="flag level for the reported flag rates"
    )
    parser.add_argument("--output-json", default=None, help="also write the report as JSON")
    parser.add_argument("--work-dir", default=None, help="where the scores' Parquet files go")
    return parser


def flag_rates(table: pa.Table) -> dict[str, float | None]:
    """Returns the fraction of rows of `table` with each flag set (None when flags are null)."""
    rates = {}
    for name in FLAG_COLUMNS:
        values = table[name].to_pylist()
        known = [value for value in values if value is not None]
        rates[name] = sum(known) / len(known) if known else None
    return rates


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Scores both sets and returns the report: metric rows, flag rates and set sizes."""
    args, beam_args = build_parser().parse_known_args(argv)
    extra = ["--alpha", str(args.alpha), *beam_args]
    if args.background_model:
        extra += ["--background-model", args.background_model]
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="pixeldensity-evaluate-"))

    in_dist = scored_rows(score_to_table(args.in_dist, args.model, str(work_dir / "in"), extra))
    ood = scored_rows(score_to_table(args.ood, args.model, str(work_dir / "ood"), extra))
    names = [name for name in SCORE_COLUMNS if _has_values(in_dist, name)]
    rows = evaluate_scores(
        {name: column_array(in_dist, name) for name in names},
        {name: column_array(ood, name) for name in names},
    )
    report = {
        "in_dist": args.in_dist,
        "ood": args.ood,
        "model": args.model,
        "alpha": args.alpha,
        "metrics": rows,
        "flag_rates": {"in_dist": flag_rates(in_dist), "ood": flag_rates(ood)},
        "mean_bits_per_dim": {
            "in_dist": float(np.mean(column_array(in_dist, "bits_per_dim"))),
            "ood": float(np.mean(column_array(ood, "bits_per_dim"))),
        },
    }
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _has_values(table: pa.Table, name: str) -> bool:
    return name in table.column_names and table[name].null_count < table.num_rows


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the table and returns the process exit status."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    quiet_beam_logging()
    report = run(argv)
    print("OOD counted as positive; a higher score means more out-of-distribution.")
    print(format_table(report["metrics"]))
    print(json.dumps({"flag_rates": report["flag_rates"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
