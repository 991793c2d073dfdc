"""Properties every registered model must have: causality, normalization, batch invariance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import pixeldensity
from pixeldensity.model import images_to_input


def _eval_model(name: str, **overrides) -> pixeldensity.DensityModel:
    model = pixeldensity.create_model(name, **overrides).double().eval()
    return model


def _random_images(model, size=(4, 4), batch=1) -> torch.Tensor:
    shape = (batch, model.config.in_channels, *size)
    return torch.randint(0, model.config.num_levels, shape, dtype=torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_models_logits_have_one_distribution_per_subpixel(model_name, channels):
    model = _eval_model(model_name, in_channels=channels)
    images = _random_images(model, size=(5, 3), batch=2)

    logits = model(images)

    assert logits.shape == (2, model.config.num_levels, channels, 5, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_models_are_causal_in_raster_then_channel_order(model_name, channels):
    model = _eval_model(model_name, in_channels=channels)
    height, width = 4, 4
    # Several images, because a random-init ReLU can be inactive for one input by chance.
    images = _random_images(model, size=(height, width), batch=4)
    x = images_to_input(images, model.config.num_levels, torch.float64).requires_grad_(True)
    logits = model.logits_from_input(x)

    for row, col, channel in itertools.product(range(height), range(width), range(channels)):
        (grad,) = torch.autograd.grad(logits[:, :, channel, row, col].sum(), x, retain_graph=True)
        grad = grad.abs().sum(dim=0)  # (C, H, W); images do not interact, so this is safe
        order = (torch.arange(height * width) * channels).view(height, width)
        position = (row * width + col) * channels + channel
        subpixel_order = order[None] + torch.arange(channels)[:, None, None]
        future = subpixel_order >= position
        assert grad[future].max() == 0, f"sub-pixel ({row},{col},{channel}) sees the future"
        if col > 0:
            assert grad[:, row, col - 1].min() > 0, f"({row},{col}) blind to the left pixel"
        if row > 0:
            assert grad[:, row - 1, col].min() > 0, f"({row},{col}) blind to the pixel above"
        if channel > 0:
            assert grad[:channel, row, col].min() > 0, f"({row},{col},{channel}) blind to R/G"


@pytest.mark.parametrize("num_levels, expected", [(256, 8.0), (2, 1.0)])
def test_models_with_uniform_logits_score_log2_levels_bits_per_dim(
    model_name, num_levels, expected
):
    model = _eval_model(model_name, num_levels=num_levels)
    torch.nn.init.zeros_(model.output_conv.weight)
    torch.nn.init.zeros_(model.output_conv.bias)
    images = _random_images(model, size=(6, 5), batch=3)

    bits_per_dim = model.bits_per_dim(images)

    assert torch.allclose(bits_per_dim, torch.full_like(bits_per_dim, expected), atol=1e-9)


def test_models_probabilities_of_all_images_sum_to_one(model_name):
    model = _eval_model(model_name, num_levels=16)
    images = torch.tensor(list(itertools.product(range(16), repeat=2)), dtype=torch.uint8)
    images = images.view(256, 1, 1, 2)

    with torch.no_grad():
        total = model.log_prob(images).exp().sum().item()

    assert abs(total - 1.0) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_models_score_an_image_the_same_alone_and_in_a_batch_of_64(model_name, dtype):
    model = pixeldensity.create_model(model_name).to(dtype).eval()
    images = _random_images(model, size=(6, 6), batch=64)

    with torch.no_grad():
        in_batch = model.bits_per_dim(images)
        alone = torch.cat([model.bits_per_dim(images[i : i + 1]) for i in (0, 17, 63)])

    assert (alone - in_batch[[0, 17, 63]]).abs().max().item() < 1e-5


def test_nll_map_sums_to_the_image_nll():
    model = _eval_model("pixelcnn_tiny", in_channels=3)
    images = _random_images(model, size=(5, 7), batch=2)

    with torch.no_grad():
        nll_map = model.nll_map(images)
        bits_per_dim = model.bits_per_dim(images)

    assert nll_map.shape == (2, 5, 7)
    assert torch.allclose(nll_map.sum(dim=(1, 2)) / (3 * 5 * 7), bits_per_dim)


def test_log_prob_is_in_nats_and_bits_per_dim_in_bits():
    model = _eval_model("pixelcnn_tiny")
    images = _random_images(model, size=(3, 3), batch=2)

    with torch.no_grad():
        log_prob = model.log_prob(images)
        bits_per_dim = model.bits_per_dim(images)

    assert torch.allclose(bits_per_dim, -log_prob / (9 * math.log(2)))


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(1, 1, 4, 4), "integer tensor"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), r"shape \(N, 1, H, W\)"),
        (torch.zeros(4, 4, dtype=torch.uint8), r"shape \(N, 1, H, W\)"),
        (torch.full((1, 1, 2, 2), 2, dtype=torch.long), r"0\.\.1"),
    ],
)
def test_models_reject_images_of_the_wrong_type_shape_or_range(images, message):
    model = pixeldensity.create_model("pixelcnn_tiny", num_levels=2)

    with pytest.raises((TypeError, ValueError), match=message):
        model(images)


def test_create_model_names_the_registered_models_for_an_unknown_name():
    with pytest.raises(ValueError, match="registered models: .*pixelcnn_small"):
        pixeldensity.create_model("pixelcnn_huge")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"in_channels": 2}, "in_channels must be 1 or 3"),
        ({"num_levels": 300}, "num_levels must be in 2..256"),
        (
            {"hidden_channels": 4, "in_channels": 3},
            r"hidden_channels must be at least 2\*in_channels \(6\)",
        ),
        ({"architecture": "transformer"}, "architecture must be one of"),
        ({"unknown": 1}, "unexpected keyword|unknown"),
    ],
)
def test_model_config_rejects_invalid_values(overrides, message):
    with pytest.raises((TypeError, ValueError), match=message):
        pixeldensity.create_model("pixelcnn_tiny", **overrides)
