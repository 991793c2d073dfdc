"""Tests for pixeldensity.metrics against hand-computed cases and brute-force counting."""

import numpy as np
import pytest

from pixeldensity.metrics import (
    EVALUATION_COLUMNS,
    auprc,
    auroc,
    evaluate_scores,
    format_table,
    fpr_at_tpr,
)


def _brute_force_auroc(in_scores, out_scores):
    wins = sum(float(o > i) + 0.5 * float(o == i) for o in out_scores for i in in_scores)
    return wins / (len(in_scores) * len(out_scores))


def _brute_force_auprc(in_scores, out_scores):
    thresholds = sorted(set(in_scores) | set(out_scores), reverse=True)
    average_precision, previous_recall = 0.0, 0.0
    for threshold in thresholds:
        true_positives = sum(score >= threshold for score in out_scores)
        false_positives = sum(score >= threshold for score in in_scores)
        recall = true_positives / len(out_scores)
        precision = true_positives / (true_positives + false_positives)
        average_precision += (recall - previous_recall) * precision
        previous_recall = recall
    return average_precision


def _brute_force_fpr_at_tpr(in_scores, out_scores, tpr):
    fprs = [
        np.mean(np.asarray(in_scores) >= threshold)
        for threshold in set(in_scores) | set(out_scores)
        if np.mean(np.asarray(out_scores) >= threshold) >= tpr
    ]
    return min(fprs)


def _tied_samples(seed, num_in=40, num_out=25):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 8, num_in).astype(float), rng.integers(2, 10, num_out).astype(float)


def test_auroc_hand_example_with_tie():
    # Pairs: 0.35 beats 0.1, ties 0.35 (1/2), loses to 0.4 and 0.8; 0.9 beats all 4 -> 5.5 / 8.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0.35, 0.9]) == pytest.approx(0.6875)


@pytest.mark.parametrize(
    ("in_scores", "out_scores", "expected"),
    [
        ([0.0, 1.0], [2.0, 3.0], 1.0),
        ([2.0, 3.0], [0.0, 1.0], 0.0),
        ([1.0, 1.0, 1.0], [1.0, 1.0], 0.5),
    ],
)
def test_auroc_extremes(in_scores, out_scores, expected):
    assert auroc(in_scores, out_scores) == expected


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pair_counting(seed):
    in_scores, out_scores = _tied_samples(seed)

    assert auroc(in_scores, out_scores) == pytest.approx(_brute_force_auroc(in_scores, out_scores))


def test_auprc_hand_example():
    # Descending: 0.8 (P, precision 1, recall 1/2), 0.4 (N), 0.35 (P, precision 2/3, recall 1).
    assert auprc([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.5 * 1.0 + 0.5 * 2.0 / 3.0)


def test_auprc_ties_enter_together():
    # One threshold flags all three tied scores: precision 2/3 at recall 1.
    assert auprc([1.0], [1.0, 1.0]) == pytest.approx(2.0 / 3.0)


def test_auprc_perfect_separation_is_one():
    assert auprc([0.0, 0.1, 0.2], [0.5, 0.6]) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_auprc_matches_brute_force(seed):
    in_scores, out_scores = _tied_samples(seed)

    assert auprc(in_scores, out_scores) == pytest.approx(_brute_force_auprc(in_scores, out_scores))


def test_fpr_at_tpr_hand_example():
    in_scores = [0.0, 0.2, 0.4, 0.6, 0.8]
    out_scores = [0.3, 0.5, 0.7, 0.9]

    # TPR 0.75 needs 3 of 4 positives: threshold 0.5 flags in-scores 0.6 and 0.8.
    assert fpr_at_tpr(in_scores, out_scores, tpr=0.75) == pytest.approx(0.4)
    # TPR 1 needs threshold 0.3: flags 0.4, 0.6, 0.8.
    assert fpr_at_tpr(in_scores, out_scores, tpr=1.0) == pytest.approx(0.6)


def test_fpr_at_tpr_does_not_round_up_required_count():
    # 0.55 * 100 is 55.00000000000001 in floating point; 55 positives must suffice. The 55
    # highest positives are 145..199, so the in-score 145.5 is flagged and 144.5 is not.
    out_scores = np.arange(100, dtype=float) + 100.0

    assert fpr_at_tpr([144.5], out_scores, tpr=0.55) == 0.0
    assert fpr_at_tpr([145.5], out_scores, tpr=0.55) == 1.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tpr", [0.5, 0.8, 0.95, 1.0])
def test_fpr_at_tpr_matches_brute_force(seed, tpr):
    in_scores, out_scores = _tied_samples(seed)

    expected = _brute_force_fpr_at_tpr(in_scores, out_scores, tpr)

    assert fpr_at_tpr(in_scores, out_scores, tpr=tpr) == pytest.approx(expected)


@pytest.mark.parametrize("tpr", [0.0, 1.5, -1.0, True, "0.9"])
def test_fpr_at_tpr_rejects_bad_tpr(tpr):
    with pytest.raises(ValueError, match=r"tpr must be a number in \(0, 1\], got"):
        fpr_at_tpr([0.0], [1.0], tpr=tpr)


@pytest.mark.parametrize("metric", [auroc, auprc, fpr_at_tpr])
@pytest.mark.parametrize(
    ("in_scores", "out_scores", "match"),
    [
        ([], [1.0], r"in_scores must be a non-empty 1-D array, got shape \(0,\)"),
        ([0.0], [[1.0, 2.0]], r"out_scores must be a non-empty 1-D array, got shape \(1, 2\)"),
        ([np.nan, 0.0], [1.0], "in_scores must be finite, got 1 NaN or infinite values"),
        ([0.0], ["high"], "out_scores must be an array of numbers"),
    ],
)
def test_metrics_reject_bad_scores(metric, in_scores, out_scores, match):
    with pytest.raises(ValueError, match=match):
        metric(in_scores, out_scores)


def test_evaluate_scores_rows():
    in_dist = {"complexity_score": [0.0, 0.1, 0.2], "bits_per_dim": [3.0, 2.0, 1.0]}
    out_dist = {"complexity_score": [0.5, 0.6], "bits_per_dim": [0.5, 4.0]}

    rows = evaluate_scores(in_dist, out_dist)

    assert [row["score"] for row in rows] == ["complexity_score", "bits_per_dim"]
    assert all(tuple(row) == EVALUATION_COLUMNS for row in rows)
    assert rows[0] == {
        "score": "complexity_score",
        "num_in": 3,
        "num_out": 2,
        "auroc": 1.0,
        "auprc": 1.0,
        "fpr_at_tpr": 0.0,
        "tpr": 0.95,
    }
    assert rows[1]["auroc"] == pytest.approx(0.5)


def test_evaluate_scores_rejects_mismatched_names():
    with pytest.raises(ValueError, match="in_dist and out_dist must name the same scores"):
        evaluate_scores({"a": [0.0]}, {"b": [1.0]})


def test_format_table_aligns_columns():
    rows = [
        {"score": "complexity_score", "auroc": 0.97125, "num_in": 1000},
        {"score": "bits_per_dim", "auroc": 0.09, "num_in": 50},
    ]

    table = format_table(rows, float_digits=3)

    assert table.splitlines() == [
        "score             auroc  num_in",
        "----------------  -----  ------",
        "complexity_score  0.971    1000",
        "bits_per_dim      0.090      50",
    ]


def test_format_table_column_order_and_missing_values():
    table = format_table([{"a": 1}, {"b": "x"}], columns=["b", "a"])

    assert table.splitlines() == ["b  a", "-  -", "-  1", "x  -"]


def test_format_table_empty_is_empty_string():
    assert format_table([]) == ""


def test_format_table_rejects_negative_digits():
    with pytest.raises(ValueError, match="float_digits must be a non-negative integer, got -1"):
        format_table([{"a": 1.0}], float_digits=-1)
