"""Calibrate a checkpoint's outlier flags on held-out in-distribution shards.

    python -m pipelines.calibrate --input "runs/shards/fashion_test-00000[0-4].tar" \\
        --model pixeldensity/pretrained/fashion_mnist_pixelcnn [--background-model CKPT] \\
        [--score complexity_score] [--compressor png] [BEAM OPTIONS]

The shards are scored by the scoring pipeline itself, and every score of the held-out images is
stored in the checkpoint's calibration block (`config.json`; the weights are not touched).
Scoring then turns a new image's score into a conformal p-value against them and flags at
p <= alpha, which keeps the false-flag rate on in-distribution images at most alpha. The
held-out images must come from the training data's population and must not have been trained
on; never calibrate on the corpus you are about to score.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipelines.options import exit_on_user_error, quiet_beam_logging
from pipelines.score_tables import column_array, score_to_table, scored_rows
from pixeldensity.calibration import Calibration, fit_calibration
from pixeldensity.checkpoint import update_calibration
from pixeldensity.scores import COMPRESSORS, DEFAULT_COMPRESSOR, OOD_SCORE_NAMES

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Returns the parser of the pipeline's own arguments (Beam's are passed through)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.calibrate",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
    )
    parser.add_argument("--input", required=True, help="held-out in-distribution shards")
    parser.add_argument("--model", required=True, help="checkpoint directory to calibrate")
    parser.add_argument("--background-model", default=None, help="background checkpoint (LLR)")
    parser.add_argument(
        "--score",
        choices=OOD_SCORE_NAMES,
        default=None,
        help="score to calibrate (default: likelihood_ratio_score with a background model, "
        "else complexity_score)",
    )
    parser.add_argument("--compressor", choices=COMPRESSORS, default=DEFAULT_COMPRESSOR)
    parser.add_argument(
        "--work-dir", default=None, help="where the calibration scores' Parquet files go"
    )
    return parser


def run(argv: Sequence[str] | None = None) -> Calibration:
    """Scores the held-out shards, fits the calibration and stores it; returns it."""
    args, beam_args = build_parser().parse_known_args(argv)
    score_name = args.score or (
        "likelihood_ratio_score" if args.background_model else "complexity_score"
    )
    # --no-flags: an older calibration in the checkpoint must not be applied (or checked).
    extra = ["--compressor", args.compressor, "--ood-score", score_name, "--no-flags", *beam_args]
    if args.background_model:
        extra += ["--background-model", args.background_model]

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="pixeldensity-calibrate-"))
    table = score_to_table(args.input, args.model, str(work_dir / "scores"), extra)
    scored = scored_rows(table)
    if scored.num_rows < table.num_rows:
        logger.warning(
            "%d of %d calibration samples could not be scored and are left out",
            table.num_rows - scored.num_rows,
            table.num_rows,
        )

    calibration = fit_calibration(
        column_array(scored, score_name),
        column_array(scored, "bits_per_dim"),
        score_name=score_name,
        compressor=args.compressor,
        source=args.input,
    )
    update_calibration(args.model, calibration.to_dict())
    summary = calibration.score_summary
    logger.info(
        "calibrated %s on %d images of %s: %s mean %.3f, 99th percentile %.3f; "
        "bits/dim mean %.3f; written into %s",
        score_name,
        calibration.num_scores,
        args.input,
        score_name,
        summary.mean,
        dict(summary.quantiles)[0.99],
        calibration.bits_per_dim_summary.mean,
        Path(args.model) / "config.json",
    )
    return calibration


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    quiet_beam_logging()
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
