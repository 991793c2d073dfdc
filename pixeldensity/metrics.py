"""Detection metrics for outlier scores: AUROC, average precision, FPR at a fixed TPR.

Convention throughout: out-of-distribution images are the positive class and a higher score
means more out-of-distribution. Implemented with numpy ranks and cumulative counts only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "EVALUATION_COLUMNS",
    "auprc",
    "auroc",
    "evaluate_scores",
    "format_table",
    "fpr_at_tpr",
]

# Column order of the rows returned by `evaluate_scores`.
EVALUATION_COLUMNS = ("score", "num_in", "num_out", "auroc", "auprc", "fpr_at_tpr", "tpr")


def _as_scores(values: Any, name: str) -> np.ndarray:
    """Validates a non-empty 1-D array of finite scores and returns it as float64."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be an array of numbers: {error}") from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        num_bad = int(np.sum(~np.isfinite(array)))
        raise ValueError(f"{name} must be finite, got {num_bad} NaN or infinite values")
    return array


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # A group of `count` ties ending at rank `end` spans end - count + 1 .. end.
    group_ends = np.cumsum(counts)
    group_ranks = group_ends - (counts - 1) / 2.0
    return group_ranks[inverse]


def auroc(in_scores: Any, out_scores: Any) -> float:
    """Area under the ROC curve, P(out score > in score) + P(tie) / 2.

    Computed from the Mann-Whitney U statistic on average ranks, O((n + m) log(n + m)).

    Args:
        in_scores: scores of in-distribution images (negatives), finite float array (n,).
        out_scores: scores of out-of-distribution images (positives), finite float array (m,).

    Returns:
        AUROC in [0, 1]; 0.5 is chance, below 0.5 means the score ranks the wrong way.

    Raises:
        ValueError: if either array is empty, not 1-D or not finite.
    """
    negatives = _as_scores(in_scores, "in_scores")
    positives = _as_scores(out_scores, "out_scores")

    ranks = _average_ranks(np.concatenate([negatives, positives]))
    positive_rank_sum = float(np.sum(ranks[negatives.size :]))
    # U counts (positive, negative) pairs with the positive above, ties as 1/2.
    u_statistic = positive_rank_sum - positives.size * (positives.size + 1) / 2.0
    return u_statistic / (negatives.size * positives.size)


def auprc(in_scores: Any, out_scores: Any) -> float:
    """Average precision with out-of-distribution as the positive class.

    AP = sum over distinct thresholds t (descending) of (R(t) - R(previous)) * P(t), where a
    threshold flags every score >= t, so tied scores enter together. Chance level is
    m / (n + m).

    Args:
        in_scores: scores of in-distribution images (negatives), finite float array (n,).
        out_scores: scores of out-of-distribution images (positives), finite float array (m,).

    Returns:
        Average precision in (0, 1].

    Raises:
        ValueError: if either array is empty, not 1-D or not finite.
    """
    negatives = _as_scores(in_scores, "in_scores")
    positives = _as_scores(out_scores, "out_scores")

    scores = np.concatenate([negatives, positives])
    is_positive = np.concatenate([np.zeros(negatives.size), np.ones(positives.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_positive = scores[order], is_positive[order]

    # Counts at each distinct threshold: keep the last position of every run of tied scores.
    is_run_end = np.append(np.diff(scores) != 0, True)
    true_positives = np.cumsum(is_positive)[is_run_end]
    num_flagged = (np.flatnonzero(is_run_end) + 1).astype(np.float64)

    precision = true_positives / num_flagged
    recall = true_positives / positives.size
    recall_steps = np.diff(recall, prepend=0.0)
    return float(np.sum(recall_steps * precision))


def _check_tpr(tpr: Any) -> float:
    if isinstance(tpr, bool) or not isinstance(tpr, numbers.Real) or not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}")
    return float(tpr)


def fpr_at_tpr(in_scores: Any, out_scores: Any, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold whose true-positive rate reaches `tpr`.

    A threshold t flags every score >= t. With k = ceil(tpr * m), t is the k-th largest
    out-of-distribution score, the highest threshold catching at least k of the m positives;
    the result is the fraction of in-distribution scores >= t (ties with t are flagged).

    Args:
        in_scores: scores of in-distribution images (negatives), finite float array (n,).
        out_scores: scores of out-of-distribution images (positives), finite float array (m,).
        tpr: required true-positive rate, in (0, 1].

    Returns:
        FPR in [0, 1]; lower is better.

    Raises:
        ValueError: if either array is empty, not 1-D or not finite, or tpr is not in (0, 1].
    """
    negatives = _as_scores(in_scores, "in_scores")
    positives = _as_scores(out_scores, "out_scores")
    tpr = _check_tpr(tpr)

    # Rounding first stops 0.55 * 100 = 55.00000000000001 from asking for 56 positives.
    num_required = max(1, math.ceil(round(tpr * positives.size, 9)))
    threshold = np.sort(positives)[positives.size - num_required]
    return float(np.mean(negatives >= threshold))


def evaluate_scores(
    in_dist: Mapping[str, Any],
    out_dist: Mapping[str, Any],
    *,
    tpr: float = 0.95,
) -> list[dict[str, Any]]:
    """Computes AUROC, AUPRC and FPR at `tpr` for each named score.

    Args:
        in_dist: score name -> scores of in-distribution images, float array (n,).
        out_dist: score name -> scores of out-of-distribution images, float array (m,); the
            same names as `in_dist`. Higher must mean more OOD for every score.
        tpr: true-positive rate for the FPR column, in (0, 1].

    Returns:
        One dict per score, in `in_dist` order, with keys `EVALUATION_COLUMNS`: score,
        num_in, num_out, auroc, auprc, fpr_at_tpr, tpr.

    Raises:
        ValueError: if the two mappings name different scores, or an array is not accepted.
    """
    if set(in_dist) != set(out_dist):
        raise ValueError(
            f"in_dist and out_dist must name the same scores, got {sorted(in_dist)} and "
            f"{sorted(out_dist)}"
        )
    tpr = _check_tpr(tpr)

    rows = []
    for name, in_scores in in_dist.items():
        out_scores = out_dist[name]
        rows.append(
            {
                "score": name,
                "num_in": int(np.size(in_scores)),
                "num_out": int(np.size(out_scores)),
                "auroc": auroc(in_scores, out_scores),
                "auprc": auprc(in_scores, out_scores),
                "fpr_at_tpr": fpr_at_tpr(in_scores, out_scores, tpr),
                "tpr": tpr,
            }
        )
    return rows


def _format_cell(value: Any, float_digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{float_digits}f}"
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    float_digits: int = 4,
) -> str:
    """Renders rows as a plain-text table: a header, a rule, one line per row.

    Numbers are right-aligned, text left-aligned, floats shown with `float_digits` decimals and
    missing values as "-".

    Args:
        rows: dicts such as those from `evaluate_scores`.
        columns: column order; defaults to the keys of the rows in order of first appearance.
        float_digits: decimals for float cells, >= 0.

    Returns:
        The table, lines joined by newlines, without a trailing newline; "" for no rows and no
        columns.

    Raises:
        ValueError: if float_digits is negative.
    """
    if isinstance(float_digits, bool) or not isinstance(float_digits, int) or float_digits < 0:
        raise ValueError(f"float_digits must be a non-negative integer, got {float_digits!r}")
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        return ""

    cells = [[_format_cell(row.get(column), float_digits) for column in columns] for row in rows]
    widths = [
        max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)
    ]
    is_numeric = [
        all(
            isinstance(row.get(column), numbers.Number)
            for row in rows
            if row.get(column) is not None
        )
        for column in columns
    ]

    def render(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if numeric else value.ljust(width)
            for value, width, numeric in zip(values, widths, is_numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    lines = [render(list(columns)), render(["-" * width for width in widths])]
    lines.extend(render(line) for line in cells)
    return "\n".join(lines)
