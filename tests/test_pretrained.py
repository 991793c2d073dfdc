"""The model that ships with the package: loadable, calibrated, and right about real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pixeldensity
from pipelines.sources import read_idx
from pixeldensity.calibration import Calibration, flag
from pixeldensity.scores import complexity_bits_per_dim_batch, complexity_score

PRETRAINED = Path(pixeldensity.__file__).parent / "pretrained" / "fashion_mnist_pixelcnn"
DEMO_DATA = Path(__file__).parents[1] / "pipelines" / "demo_data"


@pytest.fixture(scope="module")
def shipped():
    return pixeldensity.load_checkpoint(PRETRAINED)


def _default_rule(shipped, images: np.ndarray, alpha: float = 0.01) -> dict[str, np.ndarray]:
    """Scores uint8 (N, 1, 28, 28) images and flags them as the scoring job does by default."""
    with torch.no_grad():
        bits_per_dim = shipped.model.bits_per_dim(torch.from_numpy(images)).numpy()
    calibration = Calibration.from_dict(shipped.calibration)
    compressor_bits = complexity_bits_per_dim_batch(images, compressor=calibration.compressor)
    flags = flag(
        calibration, complexity_score(bits_per_dim, compressor_bits), bits_per_dim, alpha=alpha
    )
    return {"bits_per_dim": bits_per_dim, **flags}


def _demo_images(name: str) -> np.ndarray:
    images = read_idx(DEMO_DATA / f"{name}_test_9800-images-idx3-ubyte.gz")
    return images[:, None]  # (N, 1, 28, 28)


def test_shipped_model_is_small_calibrated_and_documented(shipped):
    size_bytes = sum(path.stat().st_size for path in PRETRAINED.iterdir())

    assert size_bytes < 5_000_000
    assert shipped.image_shape == (1, 28, 28)
    assert shipped.calibration["score_name"] == "complexity_score"
    assert shipped.calibration["num_scores"] >= 1000
    assert (PRETRAINED / "MODEL_CARD.md").is_file()


def test_shipped_model_flags_blank_constant_and_noise_images(shipped):
    rng = np.random.default_rng(0)
    junk = np.stack(
        [
            np.zeros((1, 28, 28), np.uint8),  # blank black
            np.full((1, 28, 28), 255, np.uint8),  # blank white
            np.full((1, 28, 28), 128, np.uint8),  # constant mid-grey
            rng.integers(0, 256, (1, 28, 28), dtype=np.uint8),  # uniform noise
        ]
    )

    flags = _default_rule(shipped, junk)

    assert np.all(flags["is_outlier"] | flags["is_atypically_simple"])


def test_shipped_model_reproduces_the_likelihood_failure_and_the_scores_fix_it(shipped):
    fashion = _default_rule(shipped, _demo_images("fashion_mnist"))
    mnist = _default_rule(shipped, _demo_images("mnist"))

    # Raw likelihood prefers the digits the model never saw ...
    assert mnist["bits_per_dim"].mean() < fashion["bits_per_dim"].mean() - 1.0
    assert 2.6 < fashion["bits_per_dim"].mean() < 3.4
    # ... while the calibrated flags pick them out, and rarely the clothes it was trained on.
    flagged = {
        name: (result["is_outlier"] | result["is_atypically_simple"]).mean()
        for name, result in (("fashion", fashion), ("mnist", mnist))
    }
    assert flagged["fashion"] < 0.06
    assert flagged["mnist"] > 0.5
