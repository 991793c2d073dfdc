"""Turn scores into outlier flags: the `FlagOutliers` transform.

Each `Scored` image becomes a full output row (see `transforms.schema`) with its outlier scores
and, when a reference is given, its flags:

- with a calibration (the checkpoint's calibration block), conformal p-values and flags from
  `pixeldensity.calibration.flag`: `is_outlier` where the upper-tail p-value of `ood_score` is
  at most alpha, `is_atypically_simple` where the lower-tail p-value of raw bits/dim is;
- with an explicit threshold instead, `is_outlier` where `ood_score` exceeds it, p-values and
  `is_atypically_simple` null;
- with neither, all four flag columns null (a warning says so once, when the transform is made).

`ood_score` is the score named by the calibration; without one, `complexity_score` (model minus
compressor bits/dim), or whichever of `pixeldensity.scores.OOD_SCORE_NAMES` is asked for, such as
`likelihood_ratio_score` when a background model scored too. The reference never comes from the
corpus being scored, so a corpus full of outliers is still judged against in-distribution data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import apache_beam as beam
import numpy as np

from pixeldensity.calibration import Calibration, flag
from pixeldensity.scores import (
    OOD_SCORE_DEFAULT,
    OOD_SCORE_NAMES,
    complexity_score,
    likelihood_ratio_score,
)
from transforms.schema import score_row
from transforms.score import Scored

logger = logging.getLogger(__name__)

__all__ = ["FlagOutliers", "resolve_ood_score_name"]


def resolve_ood_score_name(calibration: Calibration | None, requested: str | None = None) -> str:
    """Returns the name of the score `ood_score` holds.

    Args:
        calibration: The calibration flags are computed against, or None.
        requested: A name from `OOD_SCORE_NAMES`, or None for the calibration's score
            (`complexity_score` without a calibration).

    Raises:
        ValueError: `requested` is unknown or differs from the calibration's score.
    """
    if requested is not None and requested not in OOD_SCORE_NAMES:
        raise ValueError(f"ood_score_name must be one of {OOD_SCORE_NAMES}, got {requested!r}")
    if calibration is None:
        return requested or OOD_SCORE_DEFAULT
    if requested is not None and requested != calibration.score_name:
        raise ValueError(
            f"ood_score_name {requested!r} differs from the calibration's score "
            f"{calibration.score_name!r}; p-values are only valid for the calibrated score"
        )
    return calibration.score_name


def _scores_of(element: Scored, ood_score_name: str) -> dict[str, Any]:
    """The score columns of one image that need no reference, `ood_score` included."""
    scores = {
        "bits_per_dim": element.bits_per_dim,
        "complexity_bits_per_dim": element.complexity_bits_per_dim,
        "complexity_score": complexity_score(element.bits_per_dim, element.complexity_bits_per_dim),
        "background_bits_per_dim": element.background_bits_per_dim,
        "likelihood_ratio_score": None,
    }
    if element.background_bits_per_dim is not None:
        scores["likelihood_ratio_score"] = likelihood_ratio_score(
            element.bits_per_dim, element.background_bits_per_dim
        )

    ood_score = scores[ood_score_name]
    if ood_score is None:
        # The pipeline asked for a score its models cannot give: a wiring error, not a data one.
        raise ValueError(
            f"ood score {ood_score_name!r} needs a background model, but {element.key} in "
            f"{element.shard} was scored without one"
        )
    scores["ood_score"] = ood_score
    return scores


class _FlagFn(beam.DoFn):
    """Builds the full output row of each `Scored` image, flags included."""

    def __init__(
        self,
        calibration: dict[str, Any] | None,
        alpha: float,
        threshold: float | None,
        ood_score_name: str,
    ):
        self._calibration_dict = calibration
        self._alpha = alpha
        self._threshold = threshold
        self._ood_score_name = ood_score_name
        self._calibration = None

    def setup(self):
        if self._calibration_dict is not None:
            self._calibration = Calibration.from_dict(self._calibration_dict)

    def process(self, element: Scored):
        scores = _scores_of(element, self._ood_score_name)
        if self._calibration is not None:
            flags = flag(
                self._calibration,
                np.asarray([scores["ood_score"]]),
                np.asarray([scores["bits_per_dim"]]),
                alpha=self._alpha,
            )
            scores.update({name: values[0] for name, values in flags.items()})
        elif self._threshold is not None:
            scores["is_outlier"] = scores["ood_score"] > self._threshold
        yield score_row(element, scores, model_id=element.model_id)


class FlagOutliers(beam.PTransform):
    """Scores and flags each `Scored` image, producing full output rows.

    Input: a PCollection of `Scored` (the `scored` output of `ScoreImages`).
    Output: a PCollection of row dicts with every column of `transforms.schema.SCORES_SCHEMA`,
    status "ok".
    """

    def __init__(
        self,
        calibration: Calibration | Mapping[str, Any] | None = None,
        *,
        alpha: float = 0.01,
        threshold: float | None = None,
        ood_score_name: str | None = None,
        compressor: str | None = None,
        warn_without_reference: bool = True,
    ):
        """Creates the transform and checks that the reference fits the scores.

        Args:
            calibration: A `Calibration` or its dict (a checkpoint's calibration block), or
                None.
            alpha: Flag level for the calibrated p-values, strictly between 0 and 1.
            threshold: Without a calibration: flag `is_outlier` where `ood_score` exceeds this,
                in bits/dim (for the default score, model bits/dim minus compressor bits/dim).
            ood_score_name: Which score `ood_score` holds, see `resolve_ood_score_name`.
            compressor: The compressor the images were scored with; if given, it must match a
                calibration of `complexity_score`.
            warn_without_reference: Log a warning when neither a calibration nor a threshold
                is given; False where unflagged rows are the point (scoring a calibration set).

        Raises:
            ValueError: Both `calibration` and `threshold` are given; `alpha` is outside
                (0, 1) or below the smallest p-value of the calibration, 1 / (n + 1), so that
                nothing could ever be flagged; the calibration's compressor or score differ
                from the scoring's.
        """
        super().__init__()
        if isinstance(calibration, Mapping):
            calibration = Calibration.from_dict(calibration)
        if calibration is not None and threshold is not None:
            raise ValueError(
                f"give calibration or threshold, not both; got a calibration of "
                f"{calibration.score_name!r} and threshold {threshold!r}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise ValueError(f"alpha must be a number strictly between 0 and 1, got {alpha!r}")
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number of bits/dim, got {threshold!r}")
        self.ood_score_name = resolve_ood_score_name(calibration, ood_score_name)

        if calibration is not None:
            _check_calibration(calibration, alpha, compressor)
        elif threshold is None and warn_without_reference:
            logger.warning(
                "no calibration and no threshold: is_outlier, is_atypically_simple and the "
                "p-values will be null; calibrate the checkpoint or pass a threshold"
            )
        calibration_dict = calibration.to_dict() if calibration is not None else None
        self._fn = _FlagFn(calibration_dict, alpha, threshold, self.ood_score_name)

    def expand(self, scored):
        """Applies the flagging DoFn."""
        return scored | "Flag" >> beam.ParDo(self._fn)


def _check_calibration(calibration: Calibration, alpha: float, compressor: str | None) -> None:
    """Raises ValueError if the calibration cannot flag at `alpha` or used another compressor."""
    smallest_pvalue = 1.0 / (calibration.num_scores + 1)
    if alpha < smallest_pvalue:
        raise ValueError(
            f"alpha must be at least 1/(n+1) = {smallest_pvalue:.3g} for a calibration of "
            f"n={calibration.num_scores} scores, got {alpha}; nothing could be flagged"
        )
    if (
        compressor is not None
        and calibration.score_name == OOD_SCORE_DEFAULT
        and calibration.compressor != compressor
    ):
        raise ValueError(
            f"compressor must be the calibration's {calibration.compressor!r} for its "
            f"{OOD_SCORE_DEFAULT!r}, got {compressor!r}"
        )
