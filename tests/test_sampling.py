"""Sampling and completion draw from the model's own conditionals."""

from __future__ import annotations

import pytest
import torch

import pixeldensity


def _model_that_always_says(value: int, **overrides):
    model = pixeldensity.create_model("pixelcnn_tiny", **overrides).eval()
    torch.nn.init.zeros_(model.output_conv.weight)
    bias = torch.full((model.config.num_levels,), -1e4)
    bias[value] = 0.0
    model.output_conv.bias.data = bias.repeat(model.config.in_channels)
    return model


def test_sample_returns_uint8_images_of_the_requested_shape():
    model = pixeldensity.create_model("diagonal_bilstm_tiny", in_channels=3).eval()

    images = pixeldensity.sample(model, 2, (3, 4), generator=torch.Generator().manual_seed(0))

    assert images.shape == (2, 3, 3, 4)
    assert images.dtype == torch.uint8


def test_sample_follows_the_model_distribution():
    model = _model_that_always_says(7, in_channels=3)

    images = pixeldensity.sample(model, 3, (4, 4))

    assert torch.all(images == 7)


def test_complete_keeps_the_known_rows_and_fills_the_rest():
    model = _model_that_always_says(200)
    images = torch.randint(0, 100, (2, 1, 5, 4), dtype=torch.uint8)

    completed = pixeldensity.complete(model, images, 2)

    assert torch.equal(completed[:, :, :2], images[:, :, :2])
    assert torch.all(completed[:, :, 2:] == 200)


def test_complete_rejects_out_of_range_rows():
    model = pixeldensity.create_model("pixelcnn_tiny").eval()

    with pytest.raises(ValueError, match="num_known_rows must be in 0..5"):
        pixeldensity.complete(model, torch.zeros(1, 1, 5, 5, dtype=torch.uint8), 6)
