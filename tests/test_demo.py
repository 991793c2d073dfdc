"""The demo job builds its shards from the shipped data and accounts for every sample."""

from __future__ import annotations

import pytest

import pixeldensity
from pipelines import demo

pytestmark = pytest.mark.slow


def test_demo_shards_hold_every_shipped_sample(tmp_path):
    written = demo.build_demo_shards(tmp_path)

    assert written == {
        "fashion_mnist": 200,
        "mnist": 200,
        "cifar10": 40,
        "junk": 7,
        "badimages": 28,
    }


def test_demo_scores_every_sample_and_summarises_by_source(tmp_path):
    model = pixeldensity.create_model("pixelcnn_tiny")
    checkpoint = pixeldensity.save_checkpoint(
        tmp_path / "model", model, image_shape=(1, 28, 28), name="tiny"
    )

    text = demo.run(tmp_path / "out", checkpoint, ["--threshold", "0.0"])

    assert text.startswith("475 rows from 5 shards")
    for source in demo.SOURCES:
        assert f"  {source}" in text
    assert "errors by reason: " in text and "decompression_bomb 1" in text
