"""Tests for transforms.decode: per-sample decoding and the DecodeImages stage."""

import io
import pickle
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

import transforms
from transforms import decode
from transforms.decode import DecodeImages, decode_sample
from transforms.shards import ReadImageShards
from transforms.types import Decoded, ErrorRow, Sample

BADIMAGES = Path(__file__).parents[1] / "pipelines" / "demo_data" / "badimages"
SAMPLE_SHARD = Path(__file__).parent / "data" / "webdataset" / "sample.tgz"


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


GREY = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
GOOD = Sample("s.tar", "good", {"png": _png(GREY), "cls": b"3"})
BROKEN = Sample("s.tar", "broken", {"jpg": (BADIMAGES / "truncated_jpeg.jpg").read_bytes()})
NO_IMAGE = Sample("s.tar", "labels", {"cls": b"1"})
READ_ERROR = ErrorRow("s.tar", "lost", None, "truncated_shard", "shard broke at byte 512")


def _counters(result) -> dict[str, int]:
    query = result.metrics().query(MetricsFilter().with_namespace("pixeldensity"))
    return {counter.key.metric.name: counter.committed for counter in query["counters"]}


def test_transforms_exports():
    assert set(transforms.__all__) >= {
        "ReadImageShards",
        "DecodeImages",
        "Sample",
        "Decoded",
        "ErrorRow",
    }


def test_decode_sample_good():
    decoded = decode_sample(GOOD, channels=1, size=(28, 28))

    assert isinstance(decoded, Decoded)
    assert (decoded.shard, decoded.key, decoded.member) == ("s.tar", "good", "png")
    np.testing.assert_array_equal(decoded.image[0], GREY)
    assert (decoded.original_width, decoded.original_height) == (28, 28)
    assert (decoded.original_mode, decoded.original_format) == ("L", "PNG")
    assert (decoded.is_animated, decoded.num_frames) == (False, 1)


def test_decode_sample_decode_error_becomes_row():
    row = decode_sample(BROKEN, channels=3, size=(16, 16))

    assert isinstance(row, ErrorRow)
    assert (row.key, row.member, row.reason) == ("broken", "jpg", "truncated")
    assert "truncated" in row.message


def test_decode_sample_without_image_member():
    row = decode_sample(NO_IMAGE, channels=1, size=(8, 8))

    assert (row.key, row.member, row.reason) == ("labels", None, "missing_image")


def test_decode_sample_unexpected_exception_becomes_row(monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(decode, "decode_image", explode)

    row = decode_sample(GOOD, channels=1, size=(8, 8))

    assert row.reason == "decode_failed"
    assert row.message == "unexpected RuntimeError: decoder bug"


def test_error_reasons_cover_both_stages():
    assert len(set(decode.ERROR_REASONS)) == len(decode.ERROR_REASONS)
    assert {"missing_image", "truncated_shard", "truncated", "decode_failed"} <= set(
        decode.ERROR_REASONS
    )


def test_decoded_pickles():
    decoded = decode_sample(GOOD, channels=3, size=(8, 8))

    restored = pickle.loads(pickle.dumps(decoded))

    np.testing.assert_array_equal(restored.image, decoded.image)
    assert restored.key == decoded.key


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"channels": 4, "size": (8, 8)}, "channels must be 1 or 3, got 4"),
        ({"channels": 1, "size": (8, 8), "resize": "fit"}, "resize must be one of"),
    ],
)
def test_decode_images_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        DecodeImages(**options)


def test_decode_images_one_sample_in_one_out():
    pipeline = test_pipeline.TestPipeline(runner="FnApiRunner")
    result = pipeline | beam.Create([GOOD]) | DecodeImages(1, (28, 28))

    shapes = result.decoded | "Shapes" >> beam.Map(lambda row: (row.key, row.image.shape))
    assert_that(shapes, equal_to([("good", (1, 28, 28))]), label="CheckDecoded")
    assert_that(result.errors, equal_to([]), label="CheckErrors")
    pipeline.run().wait_until_finish()


def test_decode_images_routes_errors():
    pipeline = test_pipeline.TestPipeline(runner="FnApiRunner")
    elements = [GOOD, BROKEN, NO_IMAGE, READ_ERROR]
    result = pipeline | beam.Create(elements) | DecodeImages(3, (16, 16), resize="pad")

    keys = result.decoded | "Keys" >> beam.Map(lambda row: row.key)
    reasons = result.errors | "Reasons" >> beam.Map(lambda row: (row.key, row.reason))
    assert_that(keys, equal_to(["good"]), label="CheckDecoded")
    assert_that(
        reasons,
        equal_to(
            [
                ("broken", "truncated"),
                ("labels", "missing_image"),
                ("lost", "truncated_shard"),
            ]
        ),
        label="CheckErrors",
    )
    outcome = pipeline.run()
    outcome.wait_until_finish()

    assert _counters(outcome) == {
        "decoded": 1,
        "decode_errors_truncated": 1,
        "decode_errors_missing_image": 1,
    }


def test_read_and_decode_real_shard():
    pipeline = test_pipeline.TestPipeline(runner="FnApiRunner")
    result = pipeline | ReadImageShards(str(SAMPLE_SHARD)) | DecodeImages(1, (28, 28))

    summary = (
        result.decoded
        | "Summarise" >> beam.Map(lambda row: (row.image.shape, row.original_format))
        | "Count" >> beam.combiners.Count.PerElement()
    )
    assert_that(summary, equal_to([(((1, 28, 28), "PNG"), 90)]), label="CheckDecoded")
    assert_that(result.errors, equal_to([]), label="CheckErrors")
    pipeline.run().wait_until_finish()
