"""Drawing images from a density model, and completing images from their top rows.

Sampling is exact ancestral sampling in raster-then-channel order: one full forward pass per
sub-pixel, H*W*C passes in all. That is correct for every architecture but slow (seconds for a
28x28 grey image on a CPU with a small model); caching layer states would make it faster and is
not done here.
"""

from __future__ import annotations

import torch

from pixeldensity.model import DensityModel


@torch.no_grad()
def sample(
    model: DensityModel,
    num_images: int,
    image_size: tuple[int, int],
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draws `num_images` images from `model`.

    Args:
        model: a trained density model (put in eval mode by the caller).
        num_images: how many images to draw.
        image_size: (H, W).
        temperature: divides the logits; 1.0 samples the model's own distribution.
        generator: optional random generator, for reproducible draws.

    Returns:
        uint8 images (num_images, C, H, W).
    """
    height, width = image_size
    device = next(model.parameters()).device
    images = torch.zeros(
        num_images, model.config.in_channels, height, width, dtype=torch.uint8, device=device
    )
    return complete(model, images, 0, temperature=temperature, generator=generator)


@torch.no_grad()
def complete(
    model: DensityModel,
    images: torch.Tensor,
    num_known_rows: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keeps the top `num_known_rows` rows of `images` and samples the rest from `model`.

    This is the occlusion-completion experiment of the PixelRNN paper.

    Args:
        model: a trained density model.
        images: uint8 (N, C, H, W); rows from `num_known_rows` on are ignored.
        num_known_rows: rows kept as given, 0..H.
        temperature: divides the logits before sampling; must be positive.
        generator: optional random generator.

    Returns:
        A new uint8 tensor (N, C, H, W).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    height = images.shape[2]
    if not 0 <= num_known_rows <= height:
        raise ValueError(f"num_known_rows must be in 0..{height}, got {num_known_rows}")

    images = images.clone()
    images[:, :, num_known_rows:] = 0
    channels, width = images.shape[1], images.shape[3]
    for row in range(num_known_rows, height):
        for col in range(width):
            for channel in range(channels):
                logits = model(images)[:, :, channel, row, col]  # (N, L)
                probs = torch.softmax(logits.float() / temperature, dim=1)
                drawn = torch.multinomial(probs.cpu(), 1, generator=generator)
                images[:, channel, row, col] = drawn.squeeze(1).to(images)
    return images
