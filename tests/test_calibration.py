"""Tests for pixeldensity.calibration: conformal p-values, flags and the stored calibration."""

import dataclasses
import datetime
import json
import logging

import numpy as np
import pytest

from pixeldensity.calibration import (
    CALIBRATION_FORMAT_VERSION,
    MIN_CALIBRATION_SCORES,
    Calibration,
    fit_calibration,
    flag,
    lower_pvalues,
    upper_pvalues,
)

CREATED_AT = "2025-01-02T03:04:05+00:00"


def _fit(num_scores=200, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    kwargs = {
        "score_name": "complexity_score",
        "compressor": "png",
        "source": "gs://bucket/calibration-{000000..000003}.tar",
        "created_at": CREATED_AT,
    }
    kwargs.update(overrides)
    return fit_calibration(
        rng.normal(1.0, 0.3, num_scores),
        rng.normal(3.0, 0.2, num_scores),
        **kwargs,
    )


def test_upper_pvalues_hand_example():
    calibration = np.array([1.0, 2.0, 2.0, 3.0])

    pvalues = upper_pvalues(calibration, np.array([0.5, 2.0, 2.5, 3.0, 9.0]))

    # #{cal >= s} = 4, 3, 1, 1, 0; p = (1 + count) / 5.
    np.testing.assert_allclose(pvalues, [1.0, 0.8, 0.4, 0.4, 0.2])


def test_lower_pvalues_hand_example():
    calibration = np.array([1.0, 2.0, 2.0, 3.0])

    pvalues = lower_pvalues(calibration, np.array([0.5, 1.0, 2.0, 2.5, 9.0]))

    # #{cal <= s} = 0, 1, 3, 3, 4; p = (1 + count) / 5.
    np.testing.assert_allclose(pvalues, [0.2, 0.4, 0.8, 0.8, 1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pvalues_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    # Small integer range: many ties within the calibration and with the test scores.
    calibration = np.sort(rng.integers(0, 12, 300).astype(np.float64))
    scores = rng.integers(-1, 14, 500).astype(np.float64)

    num_at_least = (calibration[None, :] >= scores[:, None]).sum(axis=1)
    num_at_most = (calibration[None, :] <= scores[:, None]).sum(axis=1)

    np.testing.assert_array_equal(
        upper_pvalues(calibration, scores), (1 + num_at_least) / (calibration.size + 1)
    )
    np.testing.assert_array_equal(
        lower_pvalues(calibration, scores), (1 + num_at_most) / (calibration.size + 1)
    )


def test_pvalues_keep_score_shape():
    pvalues = upper_pvalues([1.0, 2.0], np.zeros((2, 3)))

    assert pvalues.shape == (2, 3)
    assert pvalues.dtype == np.float64


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        ([], "calibration_scores_sorted must be a non-empty 1-D array"),
        ([[1.0, 2.0]], "calibration_scores_sorted must be a non-empty 1-D array"),
        ([2.0, 1.0], "calibration_scores_sorted must be sorted ascending"),
        ([1.0, np.nan], "calibration_scores_sorted must be finite"),
    ],
)
def test_pvalues_reject_bad_calibration(calibration, match):
    with pytest.raises(ValueError, match=match):
        upper_pvalues(calibration, [1.0])


def test_pvalues_reject_nan_scores():
    # NaN would otherwise sort above every calibration score and look like an outlier.
    with pytest.raises(ValueError, match="scores must be finite, got 1 NaN"):
        lower_pvalues([1.0, 2.0], [np.nan, 1.0])


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_flag_rate_holds_alpha_on_in_distribution_data(alpha):
    # The guarantee is marginal, over the draw of the calibration set: one fixed set of 2000
    # scores alone lands outside alpha +- 0.01 for about 1 seed in 8. So 20000 test scores are
    # split over 10 independent calibration sets of 2000.
    rng = np.random.default_rng(12345)
    num_outliers = num_simple = 0
    for _ in range(10):
        calibration = fit_calibration(
            rng.gamma(2.0, 1.0, 2000),
            rng.normal(3.0, 0.4, 2000),
            score_name="complexity_score",
            compressor="png",
            source="synthetic",
        )
        flags = flag(
            calibration,
            rng.gamma(2.0, 1.0, 2000),
            rng.normal(3.0, 0.4, 2000),
            alpha=alpha,
        )
        num_outliers += int(flags["is_outlier"].sum())
        num_simple += int(flags["is_atypically_simple"].sum())

    assert abs(num_outliers / 20000 - alpha) <= 0.01
    assert abs(num_simple / 20000 - alpha) <= 0.01


def test_flag_catches_both_tails():
    calibration = _fit()

    flags = flag(
        calibration,
        np.array([1.0, 9.0, 1.0]),
        np.array([3.0, 3.0, 0.05]),
        alpha=0.01,
    )

    np.testing.assert_array_equal(flags["is_outlier"], [False, True, False])
    np.testing.assert_array_equal(flags["is_atypically_simple"], [False, False, True])
    assert flags["ood_pvalue"][1] == pytest.approx(1 / 201)
    assert flags["simplicity_pvalue"][2] == pytest.approx(1 / 201)
    assert set(flags) == {"ood_pvalue", "is_outlier", "simplicity_pvalue", "is_atypically_simple"}
    assert flags["is_outlier"].dtype == np.bool_


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.05", None])
def test_flag_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a number strictly between 0 and 1, got"):
        flag(_fit(), [1.0], [3.0], alpha=alpha)


def test_flag_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="ood_scores and bits_per_dim must have the same shape"):
        flag(_fit(), [1.0, 2.0], [3.0])


def test_flag_rejects_non_finite_scores():
    with pytest.raises(ValueError, match="bits_per_dim must be finite, got 1 NaN or infinite"):
        flag(_fit(), [1.0], [np.inf])


def test_flag_warns_when_alpha_is_unreachable(caplog):
    calibration = _fit(num_scores=50)

    with caplog.at_level(logging.WARNING, logger="pixeldensity.calibration"):
        flags = flag(calibration, [1e9], [3.0], alpha=0.01)

    assert "nothing can be flagged" in caplog.text
    assert not flags["is_outlier"][0]


def test_fit_calibration_sorts_and_counts():
    calibration = _fit(num_scores=100)

    assert calibration.num_scores == 100
    assert len(calibration.scores) == len(calibration.bits_per_dim) == 100
    assert list(calibration.scores) == sorted(calibration.scores)
    assert list(calibration.bits_per_dim) == sorted(calibration.bits_per_dim)
    assert calibration.format_version == CALIBRATION_FORMAT_VERSION
    assert calibration.scores_array.flags.writeable is False


def test_fit_calibration_default_timestamp_is_utc():
    calibration = _fit(created_at=None)

    created_at = datetime.datetime.fromisoformat(calibration.created_at)
    assert created_at.utcoffset() == datetime.timedelta(0)


def test_fit_calibration_warns_below_one_over_alpha(caplog):
    with caplog.at_level(logging.WARNING, logger="pixeldensity.calibration"):
        _fit(num_scores=50, target_alpha=0.01)

    assert "at least 100 (1 / alpha)" in caplog.text


def test_fit_calibration_rejects_too_few_scores():
    with pytest.raises(ValueError, match=f"at least {MIN_CALIBRATION_SCORES} .*got 19"):
        _fit(num_scores=MIN_CALIBRATION_SCORES - 1)


@pytest.mark.parametrize(
    ("ood_scores", "bits_per_dim", "match"),
    [
        (np.zeros(30), np.zeros(31), "ood_scores and bits_per_dim must have the same length"),
        (np.zeros((30, 2)), np.zeros(30), r"ood_scores must be 1-D, got shape \(30, 2\)"),
        (np.full(30, np.nan), np.zeros(30), "ood_scores must be finite, got 30 NaN"),
    ],
)
def test_fit_calibration_rejects_bad_arrays(ood_scores, bits_per_dim, match):
    with pytest.raises(ValueError, match=match):
        fit_calibration(
            ood_scores, bits_per_dim, score_name="complexity_score", compressor="png", source=""
        )


def test_fit_calibration_requires_compressor_for_complexity_score():
    with pytest.raises(ValueError, match=r"compressor must be one of .* for score_name"):
        _fit(compressor=None)


def test_fit_calibration_allows_no_compressor_for_likelihood_ratio():
    calibration = _fit(score_name="likelihood_ratio_score", compressor=None)

    assert calibration.compressor is None


def test_calibration_json_round_trip():
    calibration = _fit(num_scores=300)

    restored = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))

    assert restored == calibration
    np.testing.assert_array_equal(restored.scores_array, calibration.scores_array)
    np.testing.assert_array_equal(restored.bits_per_dim_array, calibration.bits_per_dim_array)


def test_calibration_to_dict_has_summaries():
    calibration = _fit(num_scores=300)

    data = calibration.to_dict()

    summary = data["score_summary"]
    assert summary["mean"] == pytest.approx(np.mean(calibration.scores))
    assert summary["std"] == pytest.approx(np.std(calibration.scores))
    assert summary["min"] == calibration.scores[0]
    assert summary["max"] == calibration.scores[-1]
    assert summary["quantiles"]["0.5"] == pytest.approx(np.median(calibration.scores))
    assert data["bits_per_dim_summary"]["mean"] == pytest.approx(np.mean(calibration.bits_per_dim))


def test_calibration_is_frozen():
    calibration = _fit()

    with pytest.raises(dataclasses.FrozenInstanceError):
        calibration.score_name = "bits_per_dim"


def _data(**changes):
    data = _fit(num_scores=30).to_dict()
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_data(format_version=2), "format_version must be 1, got 2; recalibrate"),
        (_data(format_version="1"), "format_version must be an integer, got '1'"),
        (_data(score_name="entropy"), "score_name must be one of .*got 'entropy'"),
        (_data(compressor="jpeg"), "compressor must be one of .*got 'jpeg'"),
        (_data(num_scores=31), "num_scores must equal len.*got 31, 30 and 30"),
        (_data(scores=[1.0] * 29 + [0.0]), "scores must be sorted ascending"),
        (_data(scores="1.0, 2.0"), "scores must be a list of numbers, got str"),
        (_data(bits_per_dim=[1.0] * 29 + [None]), "bits_per_dim must be finite"),
        (_data(created_at="yesterday"), "created_at must be an ISO 8601 timestamp, got"),
        (_data(source=None), "source must be a string, got None"),
        (_data(extra=1), r"unknown fields \['extra'\]"),
        ([1, 2], "calibration data must be a mapping, got list"),
    ],
)
def test_calibration_from_dict_rejects(data, match):
    with pytest.raises(ValueError, match=match):
        Calibration.from_dict(data)


@pytest.mark.parametrize("key", ["scores", "source", "created_at", "num_scores"])
def test_calibration_from_dict_names_missing_field(key):
    data = _data()
    del data[key]

    with pytest.raises(ValueError, match=rf"missing the fields \['{key}'\]"):
        Calibration.from_dict(data)


def test_calibration_from_dict_checks_version_before_fields():
    with pytest.raises(ValueError, match="format_version must be 1, got 7"):
        Calibration.from_dict({"format_version": 7})
