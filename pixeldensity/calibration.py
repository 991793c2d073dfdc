"""Conformal calibration: turns outlier scores into p-values against held-out in-distribution data.

A `Calibration` stores every outlier score (and every raw bits/dim) of a set of held-out
in-distribution images that no model trained on. A new image's p-value is its rank among them
(Vovk et al., conformal prediction; split/inductive form):

    upper p = (1 + #{calibration scores >= s}) / (n + 1)     high score = suspicious
    lower p = (1 + #{calibration scores <= s}) / (n + 1)     low score = suspicious

Flagging at p <= alpha keeps the false-flag rate on in-distribution images at or below alpha,
with a threshold fixed before the scored corpus is seen. The lower tail of raw bits/dim catches
what likelihood models get wrong: blank, constant and near-empty images, which a model finds
more likely than any real in-distribution image.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pixeldensity.scores import COMPRESSORS, OOD_SCORE_DEFAULT, OOD_SCORE_NAMES

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_FORMAT_VERSION",
    "MIN_CALIBRATION_SCORES",
    "SUMMARY_QUANTILES",
    "Calibration",
    "SummaryStats",
    "fit_calibration",
    "flag",
    "lower_pvalues",
    "upper_pvalues",
]

CALIBRATION_FORMAT_VERSION = 1

# Fewer scores than this give p-values too coarse to be useful (the smallest is 1 / (n + 1)).
MIN_CALIBRATION_SCORES = 20

# Quantile levels reported in the summaries written beside the scores.
SUMMARY_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)

_REQUIRED_KEYS = (
    "format_version",
    "score_name",
    "num_scores",
    "scores",
    "bits_per_dim",
    "compressor",
    "source",
    "created_at",
)
# Written by `to_dict` for people reading the file; recomputed from the scores on load.
_DERIVED_KEYS = ("score_summary", "bits_per_dim_summary")


@dataclass(frozen=True)
class SummaryStats:
    """Summary of a set of calibration values, in their own units.

    Attributes:
        mean: arithmetic mean.
        std: population standard deviation (ddof=0).
        minimum: smallest value.
        maximum: largest value.
        quantiles: (level, value) pairs for `SUMMARY_QUANTILES`, linear interpolation.
    """

    mean: float
    std: float
    minimum: float
    maximum: float
    quantiles: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, values: np.ndarray) -> SummaryStats:
        """Summarises a non-empty float array of shape (n,)."""
        levels = np.asarray(SUMMARY_QUANTILES)
        quantile_values = np.quantile(values, levels)
        return cls(
            mean=float(np.mean(values)),
            std=float(np.std(values)),
            minimum=float(np.min(values)),
            maximum=float(np.max(values)),
            quantiles=tuple(zip(SUMMARY_QUANTILES, map(float, quantile_values), strict=True)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-safe dict; quantile levels become string keys such as "0.05"."""
        return {
            "mean": self.mean,
            "std": self.std,
            "min": self.minimum,
            "max": self.maximum,
            "quantiles": {str(level): value for level, value in self.quantiles},
        }


def _as_sorted_values(values: Any, name: str) -> tuple[float, ...]:
    """Validates a 1-D sequence of finite floats sorted ascending and returns it as a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(f"{name} must be a list of numbers, got {type(values).__name__}")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a list of numbers: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        num_bad = int(np.sum(~np.isfinite(array)))
        raise ValueError(f"{name} must be finite, got {num_bad} NaN or infinite values")
    if np.any(np.diff(array) < 0):
        raise ValueError(f"{name} must be sorted ascending, got an unsorted sequence")
    return tuple(array.tolist())


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class Calibration:
    """Held-out in-distribution scores that outlier p-values are computed against.

    Attributes:
        score_name: the outlier score calibrated, from `pixeldensity.scores.OOD_SCORE_NAMES`.
        scores: that score for every calibration image, float, sorted ascending, bits/dim.
        bits_per_dim: raw model bits/dim of the same images, sorted ascending (independently of
            `scores`), for the low-tail simplicity check.
        num_scores: n, the number of calibration images.
        compressor: the `complexity_bits_per_dim` compressor behind the score; required for
            "complexity_score", may be None for the others.
        source: where the calibration images came from, e.g. a shard pattern.
        created_at: ISO 8601 timestamp, UTC.
        format_version: `CALIBRATION_FORMAT_VERSION` of the serialised form.

    Raises:
        ValueError: on construction, if a field breaks its constraints (types, finite and
            sorted values, equal lengths, at least `MIN_CALIBRATION_SCORES` scores, known score
            and compressor names, supported version). `scores` and `bits_per_dim` may be passed
            as any sorted 1-D sequence or array; they are stored as tuples of floats.
    """

    score_name: str
    scores: tuple[float, ...]
    bits_per_dim: tuple[float, ...]
    num_scores: int
    compressor: str | None
    source: str
    created_at: str
    format_version: int = CALIBRATION_FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_format_version(self.format_version)
        if self.score_name not in OOD_SCORE_NAMES:
            raise ValueError(
                f"score_name must be one of {OOD_SCORE_NAMES}, got {self.score_name!r}"
            )
        self._check_compressor()
        _check_str(self.source, "source")
        self._check_created_at()

        # Stored as tuples of floats: immutable, hashable and JSON-ready.
        object.__setattr__(self, "scores", _as_sorted_values(self.scores, "scores"))
        object.__setattr__(
            self, "bits_per_dim", _as_sorted_values(self.bits_per_dim, "bits_per_dim")
        )
        self._check_counts()

    def _check_compressor(self) -> None:
        if self.compressor is None:
            if self.score_name == OOD_SCORE_DEFAULT:
                raise ValueError(
                    f"compressor must be one of {COMPRESSORS} for score_name "
                    f"{OOD_SCORE_DEFAULT!r}, got None"
                )
        elif self.compressor not in COMPRESSORS:
            raise ValueError(
                f"compressor must be one of {COMPRESSORS} or None, got {self.compressor!r}"
            )

    def _check_created_at(self) -> None:
        created_at = _check_str(self.created_at, "created_at")
        try:
            datetime.datetime.fromisoformat(created_at)
        except ValueError:
            raise ValueError(
                f"created_at must be an ISO 8601 timestamp, got {created_at!r}"
            ) from None

    def _check_counts(self) -> None:
        num_scores = _check_int(self.num_scores, "num_scores")
        if num_scores != len(self.scores) or num_scores != len(self.bits_per_dim):
            raise ValueError(
                f"num_scores must equal len(scores) and len(bits_per_dim), got {num_scores}, "
                f"{len(self.scores)} and {len(self.bits_per_dim)}"
            )
        if num_scores < MIN_CALIBRATION_SCORES:
            raise ValueError(
                f"num_scores must be at least {MIN_CALIBRATION_SCORES}, got {num_scores}"
            )

    @functools.cached_property
    def scores_array(self) -> np.ndarray:
        """Read-only float64 array of shape (n,): `scores`, sorted ascending."""
        return _read_only(self.scores)

    @functools.cached_property
    def bits_per_dim_array(self) -> np.ndarray:
        """Read-only float64 array of shape (n,): `bits_per_dim`, sorted ascending."""
        return _read_only(self.bits_per_dim)

    @property
    def score_summary(self) -> SummaryStats:
        """Mean, std and quantiles of `scores`."""
        return SummaryStats.of(self.scores_array)

    @property
    def bits_per_dim_summary(self) -> SummaryStats:
        """Mean, std and quantiles of `bits_per_dim`."""
        return SummaryStats.of(self.bits_per_dim_array)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-safe dict (plain str, int, float, list, dict, None).

        The summaries are included for people reading the file; `from_dict` recomputes them.
        """
        return {
            "format_version": self.format_version,
            "score_name": self.score_name,
            "num_scores": self.num_scores,
            "compressor": self.compressor,
            "source": self.source,
            "created_at": self.created_at,
            "score_summary": self.score_summary.to_dict(),
            "bits_per_dim_summary": self.bits_per_dim_summary.to_dict(),
            "scores": list(self.scores),
            "bits_per_dim": list(self.bits_per_dim),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Rebuilds a `Calibration` from `to_dict` output (e.g. after a JSON round trip).

        Args:
            data: mapping with the keys written by `to_dict`.

        Returns:
            The validated `Calibration`.

        Raises:
            ValueError: if `data` is not a mapping, a key is missing or unknown, the version is
                not `CALIBRATION_FORMAT_VERSION`, or a field is invalid.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"calibration data must be a mapping, got {type(data).__name__}")
        # The version first, so that a file from another version gets the clearest message.
        if "format_version" in data:
            _check_format_version(data["format_version"])

        missing = [key for key in _REQUIRED_KEYS if key not in data]
        if missing:
            raise ValueError(f"calibration data is missing the fields {missing}")
        unknown = sorted(set(data) - set(_REQUIRED_KEYS) - set(_DERIVED_KEYS))
        if unknown:
            raise ValueError(
                f"calibration data has unknown fields {unknown}; accepted fields are "
                f"{list(_REQUIRED_KEYS + _DERIVED_KEYS)}"
            )
        return cls(**{key: data[key] for key in _REQUIRED_KEYS})


def _check_format_version(value: Any) -> None:
    version = _check_int(value, "format_version")
    if version != CALIBRATION_FORMAT_VERSION:
        raise ValueError(
            f"format_version must be {CALIBRATION_FORMAT_VERSION}, got {version}; "
            "recalibrate with this version of pixeldensity"
        )


def _read_only(values: tuple[float, ...]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    array.flags.writeable = False
    return array


def _as_finite_1d(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        num_bad = int(np.sum(~np.isfinite(array)))
        raise ValueError(f"{name} must be finite, got {num_bad} NaN or infinite values")
    return array


def fit_calibration(
    ood_scores: Any,
    bits_per_dim: Any,
    *,
    score_name: str,
    compressor: str | None,
    source: str,
    target_alpha: float = 0.01,
    created_at: str | None = None,
) -> Calibration:
    """Builds a `Calibration` from held-out in-distribution images.

    The images must come from the in-distribution population and must not have been used to
    train the model (or the background model): otherwise their scores are optimistically low
    and the p-values of new images too small.

    Args:
        ood_scores: outlier score per calibration image, float array of shape (n,).
        bits_per_dim: raw model bits/dim of the same images, float array of shape (n,).
        score_name: which score `ood_scores` holds, from `OOD_SCORE_NAMES`.
        compressor: the compressor behind a "complexity_score", else may be None.
        source: where the images came from, e.g. the shard pattern.
        target_alpha: the flag level planned; only used to warn when n is too small for it.
        created_at: ISO 8601 timestamp; defaults to now, UTC.

    Returns:
        A `Calibration` holding both arrays sorted ascending.

    Raises:
        ValueError: if the arrays are not 1-D, finite and of equal length, n is below
            `MIN_CALIBRATION_SCORES`, or a name is not accepted.
    """
    scores = _as_finite_1d(ood_scores, "ood_scores")
    raw_bits_per_dim = _as_finite_1d(bits_per_dim, "bits_per_dim")
    if scores.shape != raw_bits_per_dim.shape:
        raise ValueError(
            f"ood_scores and bits_per_dim must have the same length, "
            f"got {scores.size} and {raw_bits_per_dim.size}"
        )
    if scores.size < MIN_CALIBRATION_SCORES:
        raise ValueError(
            f"ood_scores must hold at least {MIN_CALIBRATION_SCORES} calibration scores, "
            f"got {scores.size}"
        )

    # The smallest p-value is 1 / (n + 1): with n below 1 / alpha almost nothing can be flagged.
    _check_alpha(target_alpha, "target_alpha")
    if scores.size < math.ceil(1.0 / target_alpha):
        logger.warning(
            "calibration has %d scores; at least %d (1 / alpha) are needed for alpha=%g, "
            "and several times that for stable p-values",
            scores.size,
            math.ceil(1.0 / target_alpha),
            target_alpha,
        )

    if created_at is None:
        created_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Calibration(
        score_name=score_name,
        scores=np.sort(scores),
        bits_per_dim=np.sort(raw_bits_per_dim),
        num_scores=int(scores.size),
        compressor=compressor,
        source=source,
        created_at=created_at,
    )


def _check_calibration_sorted(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"calibration_scores_sorted must be a non-empty 1-D array, got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("calibration_scores_sorted must be finite, got NaN or infinite values")
    if np.any(np.diff(array) < 0):
        raise ValueError("calibration_scores_sorted must be sorted ascending, got unsorted values")
    return array


def _check_scores(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        # NaN would sort above every calibration score and get the smallest p-value: a flag.
        num_bad = int(np.sum(~np.isfinite(array)))
        raise ValueError(f"{name} must be finite, got {num_bad} NaN or infinite values")
    return array


def upper_pvalues(calibration_scores_sorted: Any, scores: Any) -> np.ndarray:
    """Conformal p-values for the upper tail: p = (1 + #{cal >= s}) / (n + 1).

    Ties count as at least as extreme, so tied scores get the larger (conservative) p-value.

    Args:
        calibration_scores_sorted: float array of shape (n,), sorted ascending, finite.
        scores: finite float array of any shape, same score and units as the calibration.

    Returns:
        float64 array shaped like `scores`, values in [1 / (n + 1), 1].

    Raises:
        ValueError: if the calibration is empty, not 1-D, unsorted or non-finite, or a score is
            not finite.
    """
    calibration = _check_calibration_sorted(calibration_scores_sorted)
    values = _check_scores(scores, "scores")

    # Index of the first calibration score >= s, so n - index counts those >= s.
    num_at_least = calibration.size - np.searchsorted(calibration, values, side="left")
    return (1.0 + num_at_least) / (calibration.size + 1.0)


def lower_pvalues(calibration_scores_sorted: Any, scores: Any) -> np.ndarray:
    """Conformal p-values for the lower tail: p = (1 + #{cal <= s}) / (n + 1).

    Args:
        calibration_scores_sorted: float array of shape (n,), sorted ascending, finite.
        scores: finite float array of any shape, same score and units as the calibration.

    Returns:
        float64 array shaped like `scores`, values in [1 / (n + 1), 1].

    Raises:
        ValueError: if the calibration is empty, not 1-D, unsorted or non-finite, or a score is
            not finite.
    """
    calibration = _check_calibration_sorted(calibration_scores_sorted)
    values = _check_scores(scores, "scores")

    # Index past the last calibration score <= s is the count of those <= s.
    num_at_most = np.searchsorted(calibration, values, side="right")
    return (1.0 + num_at_most) / (calibration.size + 1.0)


def _check_alpha(alpha: Any, name: str) -> None:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not 0.0 < float(alpha) < 1.0
    ):
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {alpha!r}")


def flag(
    calibration: Calibration,
    ood_scores: Any,
    bits_per_dim: Any,
    *,
    alpha: float = 0.01,
) -> dict[str, np.ndarray]:
    """Flags outliers (upper tail of the score) and atypically simple images (lower tail of bpd).

    Guarantee: if the calibration images and a scored image are exchangeable (drawn from the
    same in-distribution population, the calibration images unseen in training), then
    P(ood_pvalue <= alpha) <= alpha, and likewise for `simplicity_pvalue`. The rate is marginal:
    averaged over the draw of the calibration set; for one fixed set of n scores the realised
    rate scatters around alpha by about sqrt(alpha * (1 - alpha) / n). Each flag holds alpha on
    its own, so an in-distribution image raises either flag with probability at most 2 * alpha.
    It is a per-image rate, not a family-wise or false-discovery rate over a corpus: scoring N
    in-distribution images flags about alpha * N of them. The threshold comes only from the
    calibration, never from the corpus being scored, so a corpus full of outliers is still
    judged against the in-distribution reference.

    Args:
        calibration: from `fit_calibration` on held-out in-distribution images.
        ood_scores: the score named by `calibration.score_name`, finite float array (N,).
        bits_per_dim: raw model bits/dim of the same images, finite float array (N,).
        alpha: flag level, strictly between 0 and 1.

    Returns:
        Dict of arrays of shape (N,): "ood_pvalue" (float64), "is_outlier" (bool,
        ood_pvalue <= alpha), "simplicity_pvalue" (float64) and "is_atypically_simple" (bool,
        simplicity_pvalue <= alpha).

    Raises:
        ValueError: if alpha is not in (0, 1), the arrays differ in shape or are not finite.
    """
    _check_alpha(alpha, "alpha")
    scores = _check_scores(ood_scores, "ood_scores")
    raw_bits_per_dim = _check_scores(bits_per_dim, "bits_per_dim")
    if scores.shape != raw_bits_per_dim.shape:
        raise ValueError(
            f"ood_scores and bits_per_dim must have the same shape, "
            f"got {scores.shape} and {raw_bits_per_dim.shape}"
        )
    if 1.0 / (calibration.num_scores + 1) > alpha:
        logger.warning(
            "alpha=%g is below the smallest p-value 1/(n+1) of a %d-score calibration: "
            "nothing can be flagged",
            alpha,
            calibration.num_scores,
        )

    ood_pvalue = upper_pvalues(calibration.scores_array, scores)
    simplicity_pvalue = lower_pvalues(calibration.bits_per_dim_array, raw_bits_per_dim)
    return {
        "ood_pvalue": ood_pvalue,
        "is_outlier": ood_pvalue <= alpha,
        "simplicity_pvalue": simplicity_pvalue,
        "is_atypically_simple": simplicity_pvalue <= alpha,
    }
