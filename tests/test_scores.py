"""Tests for pixeldensity.scores: compressor complexity and the outlier scores built on it."""

import io
import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from pixeldensity import scores
from pixeldensity.scores import (
    COMPRESSORS,
    OOD_SCORE_DEFAULT,
    OOD_SCORE_NAMES,
    choose_ood_score,
    complexity_bits_per_dim,
    complexity_bits_per_dim_batch,
    complexity_score,
    likelihood_ratio_score,
    ood_score_from_columns,
)

DEMO_CIFAR_DIR = pathlib.Path(__file__).parents[1] / "pipelines" / "demo_data" / "cifar10_test"


def _noise(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _gradient(channels, size=32):
    rows, cols = np.mgrid[0:size, 0:size]
    planes = [(rows * 7 + cols * 3 + 40 * c) % 256 for c in range(channels)]
    return np.stack(planes).astype(np.uint8)  # (C, H, W)


def test_complexity_black_png_near_zero():
    image = np.zeros((1, 28, 28), dtype=np.uint8)

    assert complexity_bits_per_dim(image) < 0.1


@pytest.mark.parametrize("value", [1, 137, 255])
@pytest.mark.parametrize("channels", [1, 3])
def test_complexity_constant_png_near_zero(value, channels):
    # A non-zero constant costs PNG a few more deflate bytes than black (a Sub-filtered first
    # row, then Up-filtered rows): about 12 bytes, 0.12 bits/dim at 1x28x28.
    image = np.full((channels, 28, 28), value, dtype=np.uint8)

    assert complexity_bits_per_dim(image) < 0.15


def test_complexity_noise_png_near_eight():
    bits = complexity_bits_per_dim(_noise((1, 28, 28)))

    # Incompressible bytes cost 8 bits each, plus PNG's per-row filter byte and block headers.
    assert 7.5 < bits < 9.0


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("channels", [1, 3])
def test_complexity_orders_constant_smooth_noise(compressor, channels):
    constant = np.full((channels, 32, 32), 90, dtype=np.uint8)
    smooth = _gradient(channels)
    noise = _noise((channels, 32, 32))

    values = [complexity_bits_per_dim(x, compressor=compressor) for x in (constant, smooth, noise)]

    assert 0.0 <= values[0] < 0.2
    assert values[0] < values[1] < values[2]
    assert values[2] > 7.0


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_complexity_is_deterministic(compressor):
    image = _gradient(3) ^ _noise((3, 32, 32), seed=1) % 4

    first = complexity_bits_per_dim(image, compressor=compressor)
    second = complexity_bits_per_dim(image.copy(), compressor=compressor)

    assert first == second


@pytest.mark.parametrize("channels", [1, 3])
def test_complexity_webp_lossless_round_trips_exactly(channels):
    image = np.concatenate([_gradient(channels)[:, :16], _noise((channels, 16, 32))], axis=1)
    pixels_hwc = np.transpose(image, (1, 2, 0))

    encoded = scores._encode_webp_lossless(pixels_hwc)
    decoded = Image.open(io.BytesIO(encoded))
    decoded = decoded.convert("L" if channels == 1 else "RGB")

    np.testing.assert_array_equal(np.asarray(decoded).reshape(pixels_hwc.shape), pixels_hwc)


def test_complexity_webp_beats_png_on_photographs():
    paths = sorted(DEMO_CIFAR_DIR.glob("*.png"))[:8]
    if not paths:
        pytest.skip(f"no demo CIFAR-10 images under {DEMO_CIFAR_DIR}")
    images = np.stack(
        [np.transpose(np.asarray(Image.open(p).convert("RGB")), (2, 0, 1)) for p in paths]
    )

    png = complexity_bits_per_dim_batch(images, compressor="png")
    webp = complexity_bits_per_dim_batch(images, compressor="webp_lossless")

    # Measured on these samples: PNG about 5.9 bits/dim, WebP lossless about 4.8.
    assert 4.0 < png.mean() < 7.5
    assert webp.mean() < 0.95 * png.mean()


def test_complexity_png_round_trips_exactly():
    image = _noise((3, 20, 24))
    pixels_hwc = np.transpose(image, (1, 2, 0))

    decoded = Image.open(io.BytesIO(scores._encode_png(pixels_hwc)))

    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), pixels_hwc)


def test_complexity_accepts_wider_integer_dtypes():
    image = _gradient(1)

    assert complexity_bits_per_dim(image.astype(np.int64)) == complexity_bits_per_dim(image)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((28, 28), dtype=np.uint8), r"image must have shape \(C, H, W\).*got shape"),
        (np.zeros((2, 8, 8), dtype=np.uint8), r"C in \(1, 3\).*\(2, 8, 8\)"),
        (np.zeros((1, 0, 8), dtype=np.uint8), r"H, W >= 1.*\(1, 0, 8\)"),
        (np.zeros((1, 8, 8), dtype=np.float32), "integer dtype.*float32"),
        (np.full((1, 8, 8), 256, dtype=np.int32), r"0\.\.255, got range 256\.\.256"),
    ],
)
def test_complexity_rejects_bad_images(image, match):
    with pytest.raises(ValueError, match=match):
        complexity_bits_per_dim(image)


def test_complexity_rejects_unknown_compressor():
    with pytest.raises(ValueError, match=r"compressor must be one of .*'png'.*got 'jpeg'"):
        complexity_bits_per_dim(np.zeros((1, 4, 4), dtype=np.uint8), compressor="jpeg")


def test_complexity_batch_matches_per_image():
    images = np.stack([np.zeros((1, 16, 16), np.uint8), _gradient(1, 16), _noise((1, 16, 16))])

    batch = complexity_bits_per_dim_batch(images, compressor="zlib")

    assert batch.shape == (3,)
    assert batch.dtype == np.float64
    expected = [complexity_bits_per_dim(image, compressor="zlib") for image in images]
    np.testing.assert_array_equal(batch, expected)


def test_complexity_batch_empty_gives_empty():
    batch = complexity_bits_per_dim_batch(np.zeros((0, 1, 8, 8), dtype=np.uint8))

    assert batch.shape == (0,)


def test_complexity_batch_rejects_non_4d():
    with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\), got shape"):
        complexity_bits_per_dim_batch(np.zeros((1, 8, 8), dtype=np.uint8))


def test_complexity_batch_rejects_unknown_compressor():
    with pytest.raises(ValueError, match="compressor must be one of"):
        complexity_bits_per_dim_batch(np.zeros((1, 1, 8, 8), np.uint8), compressor="gzip")


def test_complexity_score_scalars_give_float():
    result = complexity_score(3.5, 1.25)

    assert isinstance(result, float)
    assert result == 2.25


def test_likelihood_ratio_score_arrays():
    result = likelihood_ratio_score(np.array([3.0, 4.0]), [2.5, 4.5])

    np.testing.assert_array_equal(result, [0.5, -0.5])
    assert result.dtype == np.float64


def test_complexity_score_propagates_nan():
    result = complexity_score(np.array([np.nan, 2.0]), np.array([1.0, 1.0]))

    assert np.isnan(result[0])
    assert result[1] == 1.0


@pytest.mark.parametrize(
    ("function", "match"),
    [
        (complexity_score, "bits_per_dim and compressor_bits_per_dim must have the same shape"),
        (likelihood_ratio_score, "bits_per_dim and background_bits_per_dim must have the same"),
    ],
)
def test_scores_reject_shape_mismatch(function, match):
    with pytest.raises(ValueError, match=match):
        function(np.zeros(3), np.zeros(2))


def test_ood_score_default_is_complexity():
    assert OOD_SCORE_DEFAULT == "complexity_score"
    assert OOD_SCORE_NAMES[0] == OOD_SCORE_DEFAULT


def test_choose_ood_score_prefers_default():
    columns = ["bits_per_dim", "complexity_bits_per_dim", "background_bits_per_dim"]

    assert choose_ood_score(columns) == "complexity_score"


def test_choose_ood_score_falls_back_to_likelihood_ratio():
    assert choose_ood_score(["bits_per_dim", "background_bits_per_dim"]) == (
        "likelihood_ratio_score"
    )


def test_choose_ood_score_accepts_score_column_alone():
    assert choose_ood_score(["key", "complexity_score"]) == "complexity_score"


def test_choose_ood_score_warns_on_raw_bits_per_dim(caplog):
    with caplog.at_level(logging.WARNING, logger="pixeldensity.scores"):
        assert choose_ood_score(["bits_per_dim"]) == "bits_per_dim"

    assert "simple images will look typical" in caplog.text


def test_choose_ood_score_honours_request():
    columns = ["bits_per_dim", "complexity_bits_per_dim", "background_bits_per_dim"]

    assert choose_ood_score(columns, requested="likelihood_ratio_score") == (
        "likelihood_ratio_score"
    )


@pytest.mark.parametrize(
    ("columns", "requested", "match"),
    [
        (["bits_per_dim"], "entropy", "requested must be one of .*got 'entropy'"),
        (["bits_per_dim"], "complexity_score", "needs the columns .*complexity_bits_per_dim"),
        (["key", "width"], None, "columns must include 'bits_per_dim'.*got columns"),
    ],
)
def test_choose_ood_score_rejects(columns, requested, match):
    with pytest.raises(ValueError, match=match):
        choose_ood_score(columns, requested=requested)


def test_ood_score_from_columns_computes_from_inputs():
    columns = {
        "bits_per_dim": np.array([3.0, 5.0]),
        "complexity_bits_per_dim": np.array([1.0, 1.5]),
        "background_bits_per_dim": np.array([2.0, 2.0]),
    }

    np.testing.assert_array_equal(ood_score_from_columns(columns, "complexity_score"), [2.0, 3.5])
    np.testing.assert_array_equal(
        ood_score_from_columns(columns, "likelihood_ratio_score"), [1.0, 3.0]
    )
    np.testing.assert_array_equal(ood_score_from_columns(columns, "bits_per_dim"), [3.0, 5.0])


def test_ood_score_from_columns_reads_existing_column():
    columns = {"complexity_score": [0.5, 0.25]}

    np.testing.assert_array_equal(ood_score_from_columns(columns, "complexity_score"), [0.5, 0.25])


def test_ood_score_from_columns_rejects_missing_inputs():
    with pytest.raises(ValueError, match="needs the columns"):
        ood_score_from_columns({"bits_per_dim": [1.0]}, "likelihood_ratio_score")
