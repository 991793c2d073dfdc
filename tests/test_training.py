"""Tests of pixeldensity.training: schedule, EMA, perturbation, train step, evaluation, state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pixeldensity
from pixeldensity import training


def tiny_model():
    return pixeldensity.create_model("pixelcnn_tiny")


def random_images(num_images: int = 4, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (num_images, 1, size, size), dtype=torch.uint8)


def test_warmup_cosine_lr_rises_peaks_and_decays_to_the_floor():
    def lr(step):
        return training.warmup_cosine_lr(
            step, base_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1
        )

    assert lr(0) == pytest.approx(0.1)
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # half-way down the cosine
    assert lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)
    steps = [lr(step) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False))


def test_warmup_cosine_lr_without_warmup_starts_at_peak():
    assert training.warmup_cosine_lr(0, base_lr=2e-3, warmup_steps=0, total_steps=5) == 2e-3


def test_warmup_cosine_lr_rejects_bad_ratio():
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        training.warmup_cosine_lr(0, base_lr=1.0, warmup_steps=0, total_steps=5, min_lr_ratio=2)


def test_make_optimizer_adam_and_adamw_and_bad_name():
    model = tiny_model()
    assert isinstance(training.make_optimizer(model, "adam", lr=1e-3), torch.optim.Adam)
    assert isinstance(training.make_optimizer(model, "adamw", lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        training.make_optimizer(model, "sgd", lr=1e-3)


def test_ema_decay_ramps_up_and_averages():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = training.ExponentialMovingAverage(model, decay=0.9)
    assert ema.current_decay() == pytest.approx(0.1)

    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay 0.1: 0.1 * 0 + 0.9 * 1
    assert ema.model.weight.item() == pytest.approx(0.9)
    for _ in range(100):
        ema.update(model)
    assert ema.current_decay() == 0.9
    assert ema.model.weight.item() == pytest.approx(1.0, abs=1e-4)
    assert not ema.model.weight.requires_grad


def test_ema_state_dict_round_trip():
    model = tiny_model()
    ema = training.ExponentialMovingAverage(model)
    ema.update(model)
    restored = training.ExponentialMovingAverage(tiny_model())
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1
    for key, value in ema.model.state_dict().items():
        torch.testing.assert_close(restored.model.state_dict()[key], value)


def test_perturb_images_rate_zero_is_identity_and_rate_one_replaces_everything():
    images = torch.full((64, 3, 8, 8), 7, dtype=torch.uint8)
    assert training.perturb_images(images, 0.0) is images
    replaced = training.perturb_images(images, 1.0, generator=torch.Generator().manual_seed(0))
    assert (replaced != 7).float().mean() > 0.99
    assert replaced.dtype == torch.uint8 and int(replaced.max()) <= 255


def test_perturb_images_replaces_whole_pixels_at_the_rate():
    images = torch.full((256, 3, 16, 16), 7, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    perturbed = training.perturb_images(images, 0.25, generator=generator)

    # A chosen pixel gets new values in all channels (a channel may redraw 7 by chance).
    changed_channels = (perturbed != images).sum(dim=1)  # (N, H, W)
    touched = changed_channels > 0
    assert touched.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert (changed_channels[touched] >= 2).float().mean() > 0.99
    assert (images == 7).all()  # the input is not modified


def test_perturb_images_is_reproducible_with_a_generator_and_checks_rate():
    images = random_images()
    first = training.perturb_images(images, 0.5, generator=torch.Generator().manual_seed(1))
    second = training.perturb_images(images, 0.5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, second)
    with pytest.raises(ValueError, match="perturb rate must be in"):
        training.perturb_images(images, 1.5)


def test_step_generator_depends_on_seed_rank_and_step_only():
    def draw(seed, rank, step):
        generator = training.step_generator(seed, rank, step, torch.device("cpu"))
        return torch.rand(3, generator=generator)

    torch.testing.assert_close(draw(0, 1, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 1, 5), draw(0, 0, 5))
    assert not torch.equal(draw(0, 1, 5), draw(0, 1, 6))
    assert not torch.equal(draw(0, 1, 5), draw(1, 1, 5))


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    model = tiny_model()
    optimizer = training.make_optimizer(model, lr=1e-2)
    images = random_images(8) // 64  # few distinct values: quick to learn
    losses = [training.train_step(model, images, optimizer).bits_per_dim for _ in range(15)]
    assert losses[0] == pytest.approx(8.0, abs=0.2)  # a fresh model is near uniform
    assert losses[-1] < losses[0] - 1.0


def test_train_step_feeds_perturbed_input_and_scores_clean_targets():
    model = tiny_model()
    optimizer = training.make_optimizer(model, lr=1e-3)
    images = random_images()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))

    generator = torch.Generator().manual_seed(0)
    result = training.train_step(
        model, images, optimizer, perturb_rate=0.5, generator=generator, clip_norm=None
    )

    expected_input = training.perturb_images(
        images, 0.5, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(seen[0], expected_input)
    with torch.no_grad():
        model_loss = F.cross_entropy(model(expected_input), images.long()).item()
    # One optimiser step later the loss has moved only a little from the step's loss.
    assert result.bits_per_dim == pytest.approx(model_loss / math.log(2), abs=0.05)


def test_train_step_clips_the_gradient_norm():
    model = tiny_model()
    optimizer = training.make_optimizer(model, lr=1e-3)
    result = training.train_step(model, random_images(), optimizer, clip_norm=1e-3)
    total = torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()
    assert result.grad_norm > 1e-3
    assert total == pytest.approx(1e-3, rel=1e-3)


def test_evaluate_bits_per_dim_matches_the_model_per_image():
    model = tiny_model().eval()
    batches = [random_images(3), random_images(2)]
    result = training.evaluate_bits_per_dim(model, batches)
    expected = torch.cat([model.bits_per_dim(batch) for batch in batches]).mean().item()
    assert result.num_images == 5
    assert result.bits_per_dim == pytest.approx(expected, rel=1e-6)
    assert math.isnan(training.evaluate_bits_per_dim(model, []).bits_per_dim)


def test_training_state_round_trips_with_weights_only(tmp_path):
    model = tiny_model()
    optimizer = training.make_optimizer(model, lr=1e-3)
    training.train_step(model, random_images(), optimizer)
    state = {
        "step": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": training.rng_state(),
        "positions": torch.tensor([[0, 32]]),
        "config": {"image_size": [28, 28], "clip_norm": None},
    }
    path = tmp_path / "state.pt"
    training.save_training_state(path, state)
    loaded = training.load_training_state(path)

    assert loaded["step"] == 1 and loaded["config"] == state["config"]
    fresh = training.make_optimizer(tiny_model(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    training.set_rng_state(loaded["rng"])
    torch.testing.assert_close(loaded["positions"], state["positions"])
    assert not (tmp_path / "state.tmp").exists()
