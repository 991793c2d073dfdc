"""Tests for transforms.score (model handler, ScoreImages) and transforms.flag (FlagOutliers)."""

import json
import logging
import math
import os

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.internal import pickler
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

import pixeldensity
from pixeldensity.calibration import fit_calibration
from pixeldensity.scores import complexity_bits_per_dim
from transforms.flag import FlagOutliers
from transforms.schema import (
    FLAG_COLUMNS,
    REASON_INFERENCE_FAILED,
    REASON_NON_FINITE_SCORE,
    REASON_SHAPE_MISMATCH,
    REASON_VALUE_OUT_OF_RANGE,
)
from transforms.score import (
    DensityModelHandler,
    Scored,
    ScoreError,
    ScoreImages,
    _LoadedModels,
    load_count,
    read_checkpoint_info,
)
from transforms.types import Decoded

IMAGE_SHAPE = (1, 28, 28)
POISON_VALUE = 77  # an image filled with this value makes the poisoned model raise


class _TestFileSystem(LocalFileSystem):
    """Local files under a URL scheme of their own, standing in for gs:// in tests."""

    PREFIX = "pdtest://"

    @classmethod
    def scheme(cls):
        return "pdtest"

    def join(self, basepath, *paths):
        return self.PREFIX + os.path.join(basepath.removeprefix(self.PREFIX), *paths)

    def open(self, path, *args, **kwargs):
        return super().open(path.removeprefix(self.PREFIX), *args, **kwargs)


class _PoisonedModel(torch.nn.Module):
    """Wraps a model; raises on batches holding a poison image, NaN for all-255 images."""

    def __init__(self, model: pixeldensity.DensityModel):
        super().__init__()
        self.model = model
        self.config = model.config
        self.num_calls = 0
        self.batch_sizes = []

    def bits_per_dim(self, images: torch.Tensor) -> torch.Tensor:
        self.num_calls += 1
        self.batch_sizes.append(len(images))
        if (images == POISON_VALUE).flatten(1).all(dim=1).any():
            raise RuntimeError("poisoned image in batch")
        bits_per_dim = self.model.bits_per_dim(images)
        return torch.where((images == 255).flatten(1).all(dim=1), math.nan, bits_per_dim)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("checkpoint")
    model = pixeldensity.create_model("pixelcnn_tiny")
    return str(pixeldensity.save_checkpoint(directory, model, image_shape=IMAGE_SHAPE))


@pytest.fixture(scope="module")
def background_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("background")
    model = pixeldensity.create_model("pixelcnn_tiny")
    return str(pixeldensity.save_checkpoint(directory, model, image_shape=IMAGE_SHAPE, name="bg"))


def _decoded(key: str, image: np.ndarray) -> Decoded:
    return Decoded(
        shard="/data/shard-000.tar",
        key=key,
        member="png",
        image=image,
        original_width=image.shape[-1],
        original_height=image.shape[-2],
        original_mode="L",
        original_format="PNG",
        is_animated=False,
        num_frames=1,
    )


def _images(num_images: int, seed: int = 0, shape=IMAGE_SHAPE) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (num_images, *shape), dtype=np.uint8)
    images[:, :, :6] = 0  # a black border, so PNG has something to compress
    return images


def _batch(images: np.ndarray) -> list[Decoded]:
    return [_decoded(f"{index:06d}", image) for index, image in enumerate(images)]


def _handler(checkpoint: str, **kwargs) -> DensityModelHandler:
    info = read_checkpoint_info(checkpoint)
    return DensityModelHandler(
        checkpoint, image_shape=info.image_shape, model_id=info.model_id, **kwargs
    )


def _reference_bits_per_dim(checkpoint: str, images: np.ndarray) -> np.ndarray:
    model = pixeldensity.load_checkpoint(checkpoint).model
    with torch.no_grad():
        return model.bits_per_dim(torch.from_numpy(images)).numpy()


def _poisoned(checkpoint: str) -> _LoadedModels:
    loaded = pixeldensity.load_checkpoint(checkpoint)
    return _LoadedModels(
        _PoisonedModel(loaded.model),
        None,
        device=torch.device("cpu"),
        precision="none",
        image_shape=IMAGE_SHAPE,
        model_id=loaded.model_id,
    )


def test_handler_pickles_small(checkpoint, background_checkpoint):
    handler = _handler(checkpoint, background_checkpoint=background_checkpoint)

    assert len(pickler.dumps(handler)) < 10_000
    assert len(pickler.dumps(ScoreImages(checkpoint))) < 10_000


def test_handler_bits_per_dim_equal_model_on_same_tensors(checkpoint):
    images = _images(6)
    handler = _handler(checkpoint)

    results = handler.run_inference(_batch(images), handler.load_model())

    assert all(isinstance(result, Scored) for result in results)
    expected = _reference_bits_per_dim(checkpoint, images)
    scored = np.array([result.bits_per_dim for result in results])
    np.testing.assert_allclose(scored, expected, rtol=0, atol=1e-5)
    for result, image in zip(results, images, strict=True):
        assert result.complexity_bits_per_dim == complexity_bits_per_dim(image)
        assert result.model_id == read_checkpoint_info(checkpoint).model_id
        assert result.background_bits_per_dim is None


def test_handler_scores_do_not_depend_on_batch(checkpoint):
    images = _images(7, seed=3)
    handler = _handler(checkpoint)
    model = handler.load_model()

    together = handler.run_inference(_batch(images), model)
    alone = [handler.run_inference(_batch(images[i : i + 1]), model)[0] for i in range(7)]

    np.testing.assert_allclose(
        [result.bits_per_dim for result in together],
        [result.bits_per_dim for result in alone],
        rtol=0,
        atol=1e-5,
    )


def test_handler_background_model_scores_same_tensor(checkpoint, background_checkpoint):
    images = _images(3)
    handler = _handler(checkpoint, background_checkpoint=background_checkpoint)

    results = handler.run_inference(_batch(images), handler.load_model())

    np.testing.assert_allclose(
        [result.background_bits_per_dim for result in results],
        _reference_bits_per_dim(background_checkpoint, images),
        rtol=0,
        atol=1e-5,
    )


def test_handler_shape_mismatch_is_an_error_row_not_a_batch_failure(checkpoint):
    images = _images(3)
    batch = _batch(images)
    batch.insert(1, _decoded("wide", _images(1, shape=(1, 28, 32))[0]))
    batch.insert(3, _decoded("rgb", _images(1, shape=(3, 28, 28))[0]))
    handler = _handler(checkpoint)

    results = handler.run_inference(batch, handler.load_model())

    assert [type(result) for result in results] == [Scored, ScoreError, Scored, ScoreError, Scored]
    assert results[1].reason == REASON_SHAPE_MISMATCH
    assert "(1, 28, 32)" in results[1].message and results[3].key == "rgb"
    np.testing.assert_allclose(
        [results[i].bits_per_dim for i in (0, 2, 4)],
        _reference_bits_per_dim(checkpoint, images),
        rtol=0,
        atol=1e-5,
    )


def test_handler_value_out_of_range_for_binary_model(tmp_path):
    model = pixeldensity.create_model("pixelcnn_tiny", num_levels=2)
    checkpoint = str(pixeldensity.save_checkpoint(tmp_path, model, image_shape=IMAGE_SHAPE))
    binary = np.random.default_rng(0).integers(0, 2, IMAGE_SHAPE, dtype=np.uint8)
    handler = _handler(checkpoint)

    results = handler.run_inference(
        [_decoded("grey", _images(1)[0]), _decoded("binary", binary)], handler.load_model()
    )

    assert results[0].reason == REASON_VALUE_OUT_OF_RANGE
    assert "0..1" in results[0].message
    assert isinstance(results[1], Scored)


@pytest.mark.parametrize("poisoned_indices", [(5,), (0, 7), (2, 3)])
def test_handler_bisects_failing_batch_down_to_the_bad_images(checkpoint, poisoned_indices):
    images = _images(8)
    expected = _reference_bits_per_dim(checkpoint, images)
    for index in poisoned_indices:
        images[index] = POISON_VALUE
    handler = _handler(checkpoint)
    model = _poisoned(checkpoint)

    results = handler.run_inference(_batch(images), model)

    for index, result in enumerate(results):
        if index in poisoned_indices:
            assert isinstance(result, ScoreError)
            assert result.reason == REASON_INFERENCE_FAILED
            assert "poisoned image in batch" in result.message
            assert result.original_format == "PNG"
        else:
            assert result.bits_per_dim == pytest.approx(expected[index], abs=1e-5)
    # Each bad image costs at most two forward passes per halving level (log2 8 = 3 levels).
    assert model.model.num_calls <= 1 + 2 * 3 * len(poisoned_indices)


def test_handler_non_finite_score_is_an_error_row(checkpoint):
    images = _images(3)
    images[1] = 255
    handler = _handler(checkpoint)

    results = handler.run_inference(_batch(images), _poisoned(checkpoint))

    assert [type(result) for result in results] == [Scored, ScoreError, Scored]
    assert results[1].reason == REASON_NON_FINITE_SCORE


def test_handler_counts_bytes_of_images(checkpoint):
    batch = _batch(_images(3))

    assert _handler(checkpoint).get_num_bytes(batch) == 3 * 28 * 28


def test_handler_batch_elements_kwargs_bound_batches(checkpoint):
    handler = _handler(checkpoint, min_batch_size=4, max_batch_size=16)

    assert handler.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 16}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp8"}, "precision must be one of .* got 'fp8'"),
        ({"device": "tpu"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        ({"compressor": "gif"}, "compressor must be one of .* got 'gif'"),
        ({"min_batch_size": 8, "max_batch_size": 4}, "got 8 and 4"),
        ({"num_threads": 0}, "num_threads must be None or at least 1, got 0"),
    ],
)
def test_handler_rejects_invalid_settings(checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _handler(checkpoint, **kwargs)


def test_handler_ignores_bf16_on_cpu(checkpoint, caplog):
    handler = _handler(checkpoint, device="cpu", precision="bf16")

    with caplog.at_level(logging.WARNING, logger="transforms.score"):
        model = handler.load_model()

    assert model.precision == "none"
    assert "precision bf16 ignored on cpu" in caplog.text


def test_checkpoint_read_through_beam_filesystem(checkpoint):
    url = _TestFileSystem.PREFIX + checkpoint

    info = read_checkpoint_info(url)
    model = _handler(url).load_model()

    assert info.path == url and info.image_shape == IMAGE_SHAPE
    assert model.model_id == info.model_id


def test_read_checkpoint_info_accepts_config_file_path(checkpoint):
    info = read_checkpoint_info(os.path.join(checkpoint, "config.json"))

    assert info.path == checkpoint
    assert info.num_levels == 256 and info.calibration is None


def test_score_images_rejects_background_of_other_shape(checkpoint, tmp_path):
    model = pixeldensity.create_model("pixelcnn_tiny")
    other = pixeldensity.save_checkpoint(tmp_path, model, image_shape=(1, 32, 32))

    with pytest.raises(ValueError, match=r"image shape \(1, 28, 28\) .* got \(1, 32, 32\)"):
        ScoreImages(checkpoint, background_checkpoint=str(other))


class _CountBundlesFn(beam.DoFn):
    def start_bundle(self):
        Metrics.counter("test", "bundles").inc()

    def process(self, element):
        yield element


def _counter(result, name: str) -> int:
    counters = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return sum(counter.committed for counter in counters)


def test_score_images_splits_results_and_loads_model_once_per_process(checkpoint):
    images = _images(24)
    elements = _batch(images) + [_decoded("wide", _images(1, shape=(1, 28, 32))[0])]
    options = PipelineOptions(
        ["--runner=FnApiRunner", "--direct_num_workers=3", "--direct_running_mode=multi_threading"]
    )
    loads_before = load_count()

    pipeline = TestPipeline(options=options)
    result = (
        pipeline
        | beam.Create(elements, reshuffle=False)
        | beam.ParDo(_CountBundlesFn())
        | ScoreImages(checkpoint, batch_size=4)
    )
    assert_that(
        result.scored | "ScoredKeys" >> beam.Map(lambda scored: scored.key),
        equal_to([element.key for element in elements[:-1]]),
        label="CheckScored",
    )
    assert_that(
        result.errors | "ErrorKeys" >> beam.Map(lambda error: (error.key, error.reason)),
        equal_to([("wide", REASON_SHAPE_MISMATCH)]),
        label="CheckErrors",
    )
    run = pipeline.run()
    run.wait_until_finish()

    assert _counter(run, "bundles") >= 2
    assert load_count() - loads_before == 1
    assert _counter(run, "model_loads") == 1
    assert _counter(run, "score_errors_shape_mismatch") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["none", "bf16"])
def test_handler_on_cuda_matches_cpu(checkpoint, precision):
    images = _images(16)
    cpu = _handler(checkpoint, device="cpu")
    cuda = _handler(checkpoint, device="cuda", precision=precision)

    expected = [
        result.bits_per_dim for result in cpu.run_inference(_batch(images), cpu.load_model())
    ]
    results = cuda.run_inference(_batch(images), cuda.load_model())

    # bf16 autocast rounds activations to 8 bits of mantissa; the log-softmax stays in fp32.
    tolerance = 1e-4 if precision == "none" else 5e-2
    np.testing.assert_allclose(
        [result.bits_per_dim for result in results], expected, rtol=0, atol=tolerance
    )


def _calibration(**overrides) -> dict:
    values = {
        "ood_scores": np.linspace(0.0, 1.0, 99),
        "bits_per_dim": np.linspace(2.0, 3.0, 99),
        "score_name": "complexity_score",
        "compressor": "png",
        "source": "test",
    }
    values.update(overrides)
    return fit_calibration(**values).to_dict()


def _scored(key: str, bits_per_dim: float, complexity: float, background=None) -> Scored:
    decoded = _decoded(key, np.zeros(IMAGE_SHAPE, dtype=np.uint8))
    return Scored(
        shard=decoded.shard,
        key=key,
        member="png",
        original_width=28,
        original_height=28,
        original_mode="L",
        original_format="PNG",
        is_animated=False,
        num_frames=1,
        bits_per_dim=bits_per_dim,
        complexity_bits_per_dim=complexity,
        background_bits_per_dim=background,
        model_id="m-1",
    )


def _flag(elements, transform, tmp_path) -> list[dict]:
    """Runs `transform` on `elements`; returns the rows sorted by key."""
    path = tmp_path / "rows.json"

    def save(rows):  # a matcher runs in the pipeline; the rows come back through a file
        path.write_text(json.dumps(sorted(rows, key=lambda row: row["key"])))

    with TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        assert_that(pipeline | beam.Create(elements) | transform, save)
    return json.loads(path.read_text())


def test_flag_outliers_uses_calibration_pvalues(tmp_path):
    elements = [_scored("typical", 2.6, 2.0), _scored("odd", 9.0, 2.0), _scored("blank", 0.1, 0.0)]

    rows = _flag(elements, FlagOutliers(_calibration(), alpha=0.05), tmp_path)

    by_key = {row["key"]: row for row in rows}
    assert by_key["typical"]["ood_score"] == pytest.approx(0.6)
    # 40 of the 99 calibration scores k/98 are >= 0.6: p = (1 + 40) / (99 + 1).
    assert by_key["typical"]["ood_pvalue"] == pytest.approx(41 / 100)
    assert not by_key["typical"]["is_outlier"] and not by_key["typical"]["is_atypically_simple"]
    assert by_key["odd"]["is_outlier"] and by_key["odd"]["ood_pvalue"] == pytest.approx(0.01)
    assert by_key["blank"]["is_atypically_simple"] and not by_key["blank"]["is_outlier"]


def test_flag_outliers_threshold_only_sets_is_outlier(tmp_path):
    elements = [_scored("a", 3.0, 1.0), _scored("b", 3.0, 2.5)]

    rows = _flag(elements, FlagOutliers(threshold=1.0), tmp_path)

    assert [row["is_outlier"] for row in rows] == [True, False]
    assert all(row["ood_pvalue"] is None and row["is_atypically_simple"] is None for row in rows)


def test_flag_outliers_without_reference_warns_once_and_leaves_flags_null(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="transforms.flag"):
        transform = FlagOutliers()
        rows = _flag([_scored("a", 3.0, 1.0), _scored("b", 2.0, 1.0)], transform, tmp_path)

    assert caplog.text.count("no calibration and no threshold") == 1
    assert all(row[name] is None for row in rows for name in FLAG_COLUMNS)
    assert [row["ood_score"] for row in rows] == [2.0, 1.0]


def test_flag_outliers_likelihood_ratio_score(tmp_path):
    transform = FlagOutliers(ood_score_name="likelihood_ratio_score")

    rows = _flag([_scored("a", 3.0, 1.0, background=2.25)], transform, tmp_path)

    assert rows[0]["likelihood_ratio_score"] == rows[0]["ood_score"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"calibration": _calibration(), "threshold": 1.0}, "give calibration or threshold"),
        ({"calibration": _calibration(), "alpha": 0.001}, r"alpha must be at least 1/\(n\+1\)"),
        ({"alpha": 1.5}, "alpha must be a number strictly between 0 and 1, got 1.5"),
        ({"calibration": _calibration(), "compressor": "zlib"}, "compressor must be the"),
        (
            {"calibration": _calibration(), "ood_score_name": "bits_per_dim"},
            "differs from the calibration's score 'complexity_score'",
        ),
        ({"ood_score_name": "psnr"}, "ood_score_name must be one of"),
        ({"threshold": float("inf")}, "threshold must be a finite number"),
    ],
)
def test_flag_outliers_rejects_inconsistent_reference(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlagOutliers(**kwargs)
