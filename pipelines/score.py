"""Score a corpus of WebDataset shards: bits/dim, outlier scores and flags, one Parquet row each.

    python -m pipelines.score --input "runs/shards/fashion_test-*.tar" \\
        --model pixeldensity/pretrained/fashion_mnist_pixelcnn --output runs/scores/fashion \\
        [--alpha 0.01] [--threshold BPD] [--background-model CKPT] [--batch-size 64] \\
        [--device auto] [--precision none|bf16|fp16] [--compressor png] [BEAM OPTIONS]

Every sample of every shard becomes exactly one row, a score (status "ok") or an error
(status "error" with a reason), in files `<output>-SSSSS-of-NNNNN.parquet` that join back to the
corpus on (shard, key); see docs/output_schema.md. Arguments this parser does not know go to
Beam's `PipelineOptions`: `--runner`, `--direct_num_workers 2 --direct_running_mode
multi_processing`, Dataflow's `--project --region --temp_location --setup_file`, and so on.
Without `--runner` Beam's in-process portable runner, `FnApiRunner`, is named explicitly. Not
`DirectRunner`: in Beam 2.77 the DirectRunner, named or by default, first tries the Prism runner,
which downloads a binary from the internet (with no timeout) and only falls back to the
FnApiRunner when that fails. The FnApiRunner honours `--direct_num_workers` and
`--direct_running_mode`; under multi-processing each worker process runs torch with one thread
unless `--torch-threads` says otherwise.

Flags come from the checkpoint's calibration block when it has one (conformal p-values at
`--alpha`), else from `--threshold` on `ood_score`; with neither they are null.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

import pixeldensity
from pipelines.options import exit_on_user_error, quiet_beam_logging, split_beam_options
from pixeldensity.decoding import DEFAULT_RESIZE, RESIZE_MODES
from pixeldensity.devices import AUTOCAST_DTYPES
from pixeldensity.scores import COMPRESSORS, DEFAULT_COMPRESSOR, OOD_SCORE_NAMES
from transforms.decode import DecodeImages
from transforms.flag import FlagOutliers
from transforms.schema import SCHEMA_VERSION, error_row
from transforms.score import DEFAULT_BATCH_SIZE, ScoreImages, read_checkpoint_info
from transforms.shards import ReadImageShards
from transforms.types import METRICS_NAMESPACE
from transforms.write import PARQUET_SUFFIX, WriteScores

logger = logging.getLogger(__name__)

# Beam's in-process runner, named so that the DirectRunner's Prism attempt never happens.
DEFAULT_RUNNER = "FnApiRunner"


@dataclasses.dataclass(frozen=True)
class ScoreSummary:
    """What a scoring run did, from its Beam counters (namespace "pixeldensity").

    Attributes:
        state: The pipeline's final state, e.g. "DONE".
        rows: Rows written.
        scored: Rows with status "ok".
        errors_by_reason: Error rows per `error_reason`.
        outliers: Rows with `is_outlier` true.
        atypically_simple: Rows with `is_atypically_simple` true.
        samples_read: Samples read from the shards without a read error.
        read_errors: Error rows of the read stage (a broken sample, an unreadable shard).
        model_loads: Times a worker process loaded the model.
        output_files: The Parquet files written.
        result: Beam's `PipelineResult`, for further metrics.
    """

    state: str
    rows: int
    scored: int
    errors_by_reason: dict[str, int]
    outliers: int
    atypically_simple: int
    samples_read: int
    read_errors: int
    model_loads: int
    output_files: list[str]
    result: Any = dataclasses.field(repr=False, compare=False)


def build_parser() -> argparse.ArgumentParser:
    """Returns the parser of the pipeline's own arguments (Beam's are left unparsed)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.score",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,  # an abbreviation must not swallow a Beam option
    )
    parser.add_argument("--input", required=True, help="shard pattern, braces and globs allowed")
    parser.add_argument("--model", required=True, help="checkpoint directory, local or URL")
    parser.add_argument("--output", required=True, help="output path prefix of the Parquet files")
    parser.add_argument("--alpha", type=float, default=0.01, help="flag level of the p-values")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="flag ood_score above this (bits/dim) instead of using the calibration",
    )
    parser.add_argument(
        "--no-flags",
        action="store_true",
        help="write scores only, ignoring the checkpoint's calibration (used to calibrate)",
    )
    parser.add_argument("--background-model", default=None, help="background checkpoint (LLR)")
    parser.add_argument(
        "--ood-score",
        choices=OOD_SCORE_NAMES,
        default=None,
        help="score in ood_score without a calibration (default: complexity_score, or "
        "likelihood_ratio_score with a background model)",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=sorted(AUTOCAST_DTYPES), default="none")
    parser.add_argument(
        "--compressor",
        choices=COMPRESSORS,
        default=None,
        help=f"compressor of complexity_bits_per_dim (default: the calibration's, else "
        f"{DEFAULT_COMPRESSOR})",
    )
    parser.add_argument("--resize", choices=RESIZE_MODES, default=DEFAULT_RESIZE)
    parser.add_argument("--num-shards", type=int, default=0, help="output files; 0: runner")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads per worker process (default: 1 under multi-processing)",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, PipelineOptions]:
    """Splits `argv` into this pipeline's arguments and Beam's options (runner defaulted)."""
    args, beam_args = split_beam_options(build_parser(), argv)
    options = PipelineOptions(beam_args)
    if options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = DEFAULT_RUNNER
    return args, options


def worker_torch_threads(args: argparse.Namespace, options: PipelineOptions) -> int | None:
    """Returns torch threads per worker process: `--torch-threads`, else 1 under multi-processing.

    Several worker processes on one machine each running torch with a thread per core would
    oversubscribe the cores; None keeps torch's default (one process, or a GPU worker).
    """
    if args.torch_threads is not None:
        return args.torch_threads
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_processing" and direct.direct_num_workers != 1:
        return 1
    return None


# Runners whose workers run on this machine and so can read its local paths.
_LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")


def _warn_about_local_paths(args: argparse.Namespace, options: PipelineOptions) -> None:
    """Warns when a remote runner is given paths that exist only on this machine."""
    runner = options.view_as(StandardOptions).runner
    runner_name = runner if isinstance(runner, str) else type(runner).__name__
    if runner_name in _LOCAL_RUNNERS:
        return
    paths = {"--input": args.input, "--model": args.model, "--output": args.output}
    paths["--background-model"] = args.background_model
    for flag, path in paths.items():
        if path is not None and FileSystems.get_scheme(path) in (None, "file"):
            logger.warning(
                "%s %s is a local path, but runner %s may run workers elsewhere; use a URL "
                "such as gs://... that every worker can read",
                flag,
                path,
                runner_name,
            )


def _flags_from(calibration: dict[str, Any] | None, threshold: float | None) -> str:
    if calibration is not None:
        return "calibration"
    return "none" if threshold is None else "threshold"


def _calibration_metadata(calibration: dict[str, Any] | None) -> dict[str, Any]:
    """Identity of a calibration for the file metadata: a content hash and its provenance."""
    if calibration is None:
        return {"calibration_id": None}
    canonical = json.dumps(calibration, sort_keys=True, separators=(",", ":")).encode()
    return {
        "calibration_id": hashlib.sha256(canonical).hexdigest()[:12],
        "calibration_score_name": calibration.get("score_name"),
        "calibration_num_scores": calibration.get("num_scores"),
        "calibration_source": calibration.get("source"),
        "calibration_created_at": calibration.get("created_at"),
    }


def _stages(args: argparse.Namespace, options: PipelineOptions):
    """Makes the scoring and flagging steps; returns them and the calibration flags use.

    Sets `args.compressor` when it was left out: the calibration's compressor, so that the
    scores are comparable with the calibration scores, else the default.
    """
    if args.compressor is None:
        stored = None if args.no_flags else read_checkpoint_info(args.model).calibration
        args.compressor = (stored or {}).get("compressor") or DEFAULT_COMPRESSOR
    score_images = ScoreImages(
        args.model,
        background_checkpoint=args.background_model,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        compressor=args.compressor,
        num_threads=worker_torch_threads(args, options),
    )
    calibration = None if args.no_flags else score_images.info.calibration
    if args.no_flags and args.threshold is not None:
        raise ValueError(f"--no-flags and --threshold {args.threshold} contradict each other")
    if calibration is not None and args.threshold is not None:
        logger.info("--threshold given: the checkpoint's calibration is not used for flags")
        calibration = None

    ood_score_name = args.ood_score
    if ood_score_name is None and calibration is None and args.background_model is not None:
        ood_score_name = "likelihood_ratio_score"
    flag_outliers = FlagOutliers(
        calibration,
        alpha=args.alpha,
        threshold=args.threshold,
        ood_score_name=ood_score_name,
        compressor=args.compressor,
        warn_without_reference=not args.no_flags,
    )
    if flag_outliers.ood_score_name == "likelihood_ratio_score" and not args.background_model:
        raise ValueError("ood score likelihood_ratio_score needs --background-model, got none")
    return score_images, flag_outliers, calibration


def build(pipeline: beam.Pipeline, args: argparse.Namespace, options: PipelineOptions) -> dict:
    """Adds the scoring steps to `pipeline`; returns the file metadata written.

    Raises:
        ValueError: An argument does not fit the checkpoint(s) or the shards match nothing.
    """
    _warn_about_local_paths(args, options)
    score_images, flag_outliers, calibration = _stages(args, options)
    info = score_images.info
    metadata = {
        "model_id": info.model_id,
        "background_model_id": score_images.background_model_id,
        "ood_score_name": flag_outliers.ood_score_name,
        "flags_from": _flags_from(calibration, args.threshold),
        "alpha": args.alpha if calibration is not None else None,
        "threshold": args.threshold,
        "compressor": args.compressor,
        "input": args.input,
        "producer": f"pixeldensity {pixeldensity.__version__} pipelines.score",
        **_calibration_metadata(calibration),
    }

    channels, height, width = info.image_shape
    samples = pipeline | "ReadShards" >> ReadImageShards(args.input)
    decoded = samples | "Decode" >> DecodeImages(channels, (height, width), resize=args.resize)
    scored = decoded.decoded | "Score" >> score_images
    score_rows = scored.scored | "Flag" >> flag_outliers
    error_rows = (
        (decoded.errors, scored.errors)
        | "MergeErrors" >> beam.Flatten()
        | "ErrorRows" >> beam.Map(error_row, model_id=info.model_id)
    )
    _ = (
        (score_rows, error_rows)
        | "MergeRows" >> beam.Flatten()
        | "Write" >> WriteScores(args.output, metadata=metadata, num_shards=args.num_shards)
    )
    return metadata


def _counters(result) -> dict[str, int]:
    """Sums the committed (else attempted) counters of the "pixeldensity" namespace by name."""
    totals: dict[str, int] = {}
    try:
        query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    except (AttributeError, NotImplementedError):
        logger.warning("this runner reports no metrics; the summary counts will read 0")
        return totals
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        name = counter.key.metric.name
        totals[name] = totals.get(name, 0) + int(value or 0)
    return totals


def summarize(result, output_prefix: str) -> ScoreSummary:
    """Builds the `ScoreSummary` of a finished run from its counters and its output files."""
    counters = _counters(result)
    errors = {
        name.removeprefix("errors_"): count
        for name, count in sorted(counters.items())
        if name.startswith("errors_") and count
    }
    pattern = f"{output_prefix}-*-of-*{PARQUET_SUFFIX}"
    output_files = sorted(item.path for item in FileSystems.match([pattern])[0].metadata_list)
    return ScoreSummary(
        state=str(result.state),
        rows=counters.get("rows", 0),
        scored=counters.get("scored", 0),
        errors_by_reason=errors,
        outliers=counters.get("outliers", 0),
        atypically_simple=counters.get("atypically_simple", 0),
        samples_read=counters.get("samples_read", 0),
        read_errors=counters.get("read_errors", 0),
        model_loads=counters.get("model_loads", 0),
        output_files=output_files,
        result=result,
    )


def run(argv: Sequence[str] | None = None, *, pipeline: beam.Pipeline | None = None):
    """Builds and runs the scoring pipeline, waits for it, and logs a summary.

    Args:
        argv: Command-line arguments, this pipeline's and Beam's; None reads `sys.argv`.
        pipeline: A pipeline to build into (e.g. a `TestPipeline`); None makes one from the
            Beam options in `argv`.

    Returns:
        The run's `ScoreSummary` (its `result` is Beam's `PipelineResult`).

    Raises:
        ValueError: An argument is invalid or does not fit the checkpoint.
    """
    args, options = parse_args(sys.argv[1:] if argv is None else argv)
    if pipeline is None:
        pipeline = beam.Pipeline(options=options)
    metadata = build(pipeline, args, options)

    result = pipeline.run()
    result.wait_until_finish()
    summary = summarize(result, args.output)
    errors = ", ".join(f"{reason} {count}" for reason, count in summary.errors_by_reason.items())
    logger.info(
        "scored %s with %s: %d rows, %d ok, %d errors (%s), %d outliers, %d atypically simple; "
        "%d model loads; %d files at %s-*%s (schema %s, flags from %s)",
        args.input,
        metadata["model_id"],
        summary.rows,
        summary.scored,
        summary.rows - summary.scored,
        errors or "none",
        summary.outliers,
        summary.atypically_simple,
        summary.model_loads,
        len(summary.output_files),
        args.output,
        PARQUET_SUFFIX,
        SCHEMA_VERSION,
        metadata["flags_from"],
    )
    # One row per sample: what the read stage emitted must all have been written.
    if summary.rows != summary.samples_read + summary.read_errors:
        logger.error(
            "rows written (%d) differ from samples read (%d) plus read errors (%d)",
            summary.rows,
            summary.samples_read,
            summary.read_errors,
        )
    return summary


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status.

    Exit status 1 when samples were read but none could be scored (so a scheduler notices a
    run that produced only error rows), 2 for a user error such as a bad pattern.
    """
    # force: importing Beam has already given the root logger a WARNING-level handler.
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    quiet_beam_logging()
    summary = run(argv)
    if summary.rows and not summary.scored:
        logger.error("none of the %d rows was scored; see error_reason in the output", summary.rows)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
