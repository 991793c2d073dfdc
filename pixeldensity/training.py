"""Torch-only pieces of training a density model: schedule, EMA, perturbation, step, evaluation.

The training pipeline (`pipelines.train`) wires these to WebDataset shards, DistributedDataParallel
and checkpoints; everything here works on plain tensors and batch iterators, so it is tested
without any data files. Losses are in bits per sub-pixel ("bits/dim"): the mean cross-entropy in
nats divided by ln 2, the same quantity `DensityModel.bits_per_dim` reports per image.

The training-state file written by `save_training_state` holds only tensors, numbers, strings
and containers of them, and is read back with `torch.load(weights_only=True)`: resuming never
unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw")


def make_optimizer(
    model: nn.Module,
    name: str = "adam",
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """Builds Adam or AdamW over the model's parameters.

    Args:
        model: the model to optimise.
        name: "adam" (L2 penalty in the gradient when `weight_decay` > 0) or "adamw"
            (decoupled weight decay).
        lr: the peak learning rate; the schedule sets the actual one every step.
        weight_decay: weight decay coefficient.
        betas: Adam's moment decay rates.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    optimizer_class = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return optimizer_class(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)


def warmup_cosine_lr(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning rate of `step` (0-based): linear warm-up, then cosine decay.

    During warm-up the rate rises linearly from base_lr/warmup_steps (step 0) to base_lr
    (step warmup_steps - 1); it then falls along half a cosine to base_lr * min_lr_ratio at
    `total_steps`, and stays there past it.

    Args:
        step: the optimisation step about to be taken, counted from 0.
        base_lr: the peak rate.
        warmup_steps: steps of linear warm-up (0 for none).
        total_steps: the step at which the decay ends.
        min_lr_ratio: final rate as a fraction of `base_lr`, in [0, 1].

    Returns:
        The learning rate.
    """
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}"
        )
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class ExponentialMovingAverage:
    """An exponential moving average of a model's weights, kept in a separate copy of the model.

    The effective decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates, so early
    averages are not dominated by the random initial weights. Buffers are copied, not averaged.

    Args:
        model: the model being trained (not a DDP wrapper: pass `ddp_model.module`).
        decay: the long-run decay per update, in [0, 1).

    Attributes:
        model: the averaged model, in eval mode and without gradients.
        num_updates: how many times `update` was called.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards the weights of `model` (same architecture)."""
        decay = self.current_decay()
        averaged = self.model.state_dict()
        for name, value in model.state_dict().items():
            target = averaged[name]
            if value.dtype.is_floating_point:
                target.lerp_(value.detach(), 1.0 - decay)
            else:
                target.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the update count, for the training-state file."""
        return {"weights": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what `state_dict` returned."""
        self.model.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """A random generator for one training step of one rank, seeded from (seed, rank, step).

    Re-seeding at every step makes the perturbation noise a pure function of the step, so a
    resumed run draws exactly the noise an uninterrupted run would, with no state to save.
    """
    generator = torch.Generator(device=device)
    # Large odd multipliers spread the three integers over distinct 63-bit seeds.
    mixed = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step) % (2**63 - 1)
    generator.manual_seed(mixed)
    return generator


def perturb_images(
    images: torch.Tensor,
    rate: float,
    *,
    num_levels: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replaces a fraction `rate` of the pixels with uniform random values.

    Used to train a background model for likelihood-ratio outlier scores: the model sees the
    perturbed image and is trained to predict the clean one. Each pixel location is chosen with
    probability `rate`; all of its channels are then replaced by independent uniform values in
    0..num_levels-1.

    Args:
        images: integer images (N, C, H, W).
        rate: the probability of replacing a pixel, in [0, 1].
        num_levels: values per sub-pixel.
        generator: the random generator (on the images' device); None for the global one.

    Returns:
        A new tensor like `images`; `images` itself is unchanged. With rate 0 it is `images`.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"perturb rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return images
    batch, _, height, width = images.shape
    device = images.device
    chosen = torch.rand((batch, 1, height, width), generator=generator, device=device) < rate
    noise = torch.randint(
        0, num_levels, images.shape, generator=generator, device=device, dtype=images.dtype
    )
    return torch.where(chosen, noise, images)


@dataclass
class StepResult:
    """What one training step measured.

    Attributes:
        bits_per_dim: the batch's mean training loss in bits per sub-pixel.
        grad_norm: total gradient norm before clipping (inf/nan if it overflowed).
    """

    bits_per_dim: float
    grad_norm: float


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    perturb_rate: float = 0.0,
    generator: torch.Generator | None = None,
    clip_norm: float | None = 1.0,
    autocast: contextlib.AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One optimisation step on a batch: loss = cross_entropy(model(perturbed), clean).

    Args:
        model: a `DensityModel`, or a DistributedDataParallel wrapper of one.
        images: clean integer images (N, C, H, W), already on the model's device.
        optimizer: the optimiser of the model's parameters.
        perturb_rate: fraction of input pixels replaced by noise (see `perturb_images`).
        generator: random generator for the perturbation.
        clip_norm: clip the total gradient norm to this; None to not clip.
        autocast: context for the forward pass (see `pixeldensity.devices.autocast`).
        scaler: a GradScaler for float16 autocast; None otherwise.

    Returns:
        The step's loss in bits/dim and gradient norm.
    """
    model.train()
    num_levels = _unwrap(model).config.num_levels
    inputs = perturb_images(images, perturb_rate, num_levels=num_levels, generator=generator)

    with autocast or contextlib.nullcontext():
        logits = model(inputs)  # (N, L, C, H, W)
    # The loss is taken in float32: a half-precision log-softmax over 256 levels loses bits.
    loss = F.cross_entropy(logits.float(), images.long())

    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = _clip_gradients(model, clip_norm)

    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(bits_per_dim=loss.item() / math.log(2), grad_norm=grad_norm)


@dataclass
class EvalResult:
    """Bits/dim summed over images, so results of several processes can be added up.

    Attributes:
        sum_bits_per_dim: the sum over images of each image's bits/dim.
        num_images: how many images were evaluated.
    """

    sum_bits_per_dim: float
    num_images: int

    @property
    def bits_per_dim(self) -> float:
        """The mean bits/dim per image (nan when no image was evaluated)."""
        return self.sum_bits_per_dim / self.num_images if self.num_images else math.nan


@torch.no_grad()
def evaluate_bits_per_dim(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
) -> EvalResult:
    """Evaluates the exact bits/dim of every image of a finite batch iterator.

    Args:
        model: a `DensityModel` (use the EMA copy); it is put in eval mode.
        batches: integer image batches (N, C, H, W), on any device.
        device: where to run the model.
        autocast: context for the forward pass; the likelihood itself is taken in float32.

    Returns:
        The summed bits/dim and the image count.
    """
    model.eval()
    total, count = 0.0, 0
    for images in batches:
        images = images.to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():
            bits = model.bits_per_dim(images)  # (N,)
        total += float(bits.double().sum())
        count += images.shape[0]
    return EvalResult(sum_bits_per_dim=total, num_images=count)


def rng_state() -> dict[str, Any]:
    """The global torch random states (CPU, and every CUDA device when there is one)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state` returned (CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Writes a training-state dict with `torch.save`, atomically (temporary file + rename).

    Args:
        path: the file to write.
        state: tensors, numbers, strings, None and lists/tuples/dicts of them only, so that
            `load_training_state` can read it with `weights_only=True`.
    """
    path = Path(path)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a training-state file without unpickling arbitrary objects (`weights_only=True`).

    Tensors are loaded onto the CPU; `load_state_dict` calls move them where they belong.
    """
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or similar `.module`) wrapper."""
    return getattr(model, "module", model)


def _clip_gradients(model: nn.Module, clip_norm: float | None) -> float:
    """Clips the total gradient norm to `clip_norm` (if given); returns the norm before."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    if clip_norm is None:
        norms = [p.grad.detach().norm() for p in parameters]
        return float(torch.stack(norms).norm()) if norms else 0.0
    return float(torch.nn.utils.clip_grad_norm_(parameters, clip_norm))
