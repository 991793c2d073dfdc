"""The shared skeleton of every density model: configuration, input conversion and likelihood.

Every architecture in this package has the shape of the PixelRNN paper's models (van den Oord
et al., 2016): a 7x7 mask-A convolution, a stack of residual layers that differ per family,
learnable skip connections from each layer to the output, and a head of ReLU + 1x1 mask-B
convolutions that ends in a 256-way (or `num_levels`-way) softmax per sub-pixel. The families
only supply their layer (`pixelcnn.py`, `pixelrnn.py`); the named presets live in `registry.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixeldensity.layers import MaskedConv2d

ARCHITECTURES = ("pixelcnn", "row_lstm", "diagonal_bilstm")


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a density model; stored inside every checkpoint.

    Attributes:
        architecture: one of `ARCHITECTURES`.
        in_channels: image channels C, 1 (grey) or 3 (RGB).
        num_levels: values per sub-pixel (256 for 8-bit images, 2 for binarized ones).
        hidden_channels: feature maps carried between layers (PixelCNN blocks narrow to half of
            this inside). At least 2*in_channels.
        num_layers: residual layers after the input convolution (the paper uses up to 12).
        head_channels: width of the hidden 1x1 layer of the output head; at least in_channels.
        input_kernel_size: size of the first, mask-A convolution (7 in the paper).
    """

    architecture: str
    in_channels: int = 1
    num_levels: int = 256
    hidden_channels: int = 64
    num_layers: int = 7
    head_channels: int = 256
    input_kernel_size: int = 7

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if not 2 <= self.num_levels <= 256:
            raise ValueError(f"num_levels must be in 2..256, got {self.num_levels}")
        if self.hidden_channels < 2 * self.in_channels:
            raise ValueError(
                f"hidden_channels must be at least 2*in_channels ({2 * self.in_channels}), "
                f"got {self.hidden_channels}"
            )
        if self.head_channels < self.in_channels:
            raise ValueError(
                f"head_channels must be at least in_channels ({self.in_channels}), "
                f"got {self.head_channels}"
            )
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")
        if self.input_kernel_size < 1 or self.input_kernel_size % 2 == 0:
            raise ValueError(f"input_kernel_size must be odd, got {self.input_kernel_size}")

    def to_dict(self) -> dict:
        """Returns the configuration as a JSON-safe dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Rebuilds a configuration from `to_dict()` output; unknown keys are an error."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; accepted: {sorted(known)}")
        return cls(**values)


def images_to_input(images: torch.Tensor, num_levels: int, dtype: torch.dtype) -> torch.Tensor:
    """Converts integer images (N, C, H, W) in 0..num_levels-1 to the float model input in [-1, 1].

    This is the only place pixel values become floats; training, scoring and sampling share it.
    """
    return images.to(dtype) * (2.0 / (num_levels - 1)) - 1.0


def check_images(images: torch.Tensor, in_channels: int, num_levels: int) -> None:
    """Raises a ValueError unless `images` is an integer (N, in_channels, H, W) tensor in range.

    The value range is checked too: an out-of-range target would index past the softmax.
    """
    if images.dtype.is_floating_point or images.dtype == torch.bool:
        raise TypeError(f"images must be an integer tensor (uint8), got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] != in_channels:
        raise ValueError(
            f"images must have shape (N, {in_channels}, H, W), got {tuple(images.shape)}"
        )
    if images.numel() and (int(images.min()) < 0 or int(images.max()) >= num_levels):
        raise ValueError(
            f"image values must lie in 0..{num_levels - 1}, got "
            f"{int(images.min())}..{int(images.max())}"
        )


class DensityModel(nn.Module):
    """Base class of the autoregressive image models: p(x) = prod over sub-pixels p(x_i | x_<i).

    Subclasses supply `make_layer()`, a shape-preserving residual layer on
    (N, hidden_channels, H, W) features that respects the causal ordering. Everything else, the
    likelihood included, is shared. The model holds no batch statistics: an image's score never
    depends on the other images in its batch.

    Args:
        config: the model's hyperparameters.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        channels, hidden = config.in_channels, config.hidden_channels

        self.input_conv = MaskedConv2d(
            channels,
            hidden,
            config.input_kernel_size,
            mask_type="A",
            num_channels=channels,
        )
        self.layers = nn.ModuleList(self.make_layer() for _ in range(config.num_layers))
        self.skip_convs = nn.ModuleList(
            MaskedConv2d(hidden, hidden, 1, mask_type="B", num_channels=channels)
            for _ in range(config.num_layers)
        )
        self.head_conv = MaskedConv2d(
            hidden, config.head_channels, 1, mask_type="B", num_channels=channels
        )
        self.output_conv = MaskedConv2d(
            config.head_channels,
            channels * config.num_levels,
            1,
            mask_type="B",
            num_channels=channels,
        )

    def make_layer(self) -> nn.Module:
        """Returns one residual layer of the family; subclasses must override it."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Computes the logits of every sub-pixel given the sub-pixels before it.

        Args:
            images: integer tensor (N, C, H, W) with values in 0..num_levels-1.

        Returns:
            logits (N, num_levels, C, H, W) in the dtype of the model's parameters.
        """
        config = self.config
        check_images(images, config.in_channels, config.num_levels)
        x = images_to_input(images, config.num_levels, self.input_conv.weight.dtype)
        return self.logits_from_input(x)

    def logits_from_input(self, x: torch.Tensor) -> torch.Tensor:
        """Computes logits from the float input (N, C, H, W) in [-1, 1]; see `images_to_input`.

        Exposed so that gradients with respect to the input can be taken (the causality tests).
        """
        features = self.input_conv(x)  # (N, hidden, H, W)
        skip = 0.0
        for layer, skip_conv in zip(self.layers, self.skip_convs, strict=True):
            features = layer(features)
            skip = skip + skip_conv(features)

        hidden = self.head_conv(F.relu(skip))
        logits = self.output_conv(F.relu(hidden))  # (N, C * L, H, W), groups contiguous per C
        batch, _, height, width = logits.shape
        channels, num_levels = self.config.in_channels, self.config.num_levels
        logits = logits.view(batch, channels, num_levels, height, width)
        return logits.transpose(1, 2)  # (N, L, C, H, W)

    def nll_nats_per_subpixel(self, images: torch.Tensor) -> torch.Tensor:
        """Returns -log p of every sub-pixel, in nats, shape (N, C, H, W), float32 or wider."""
        logits = self(images)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # a half-precision log-softmax over 256 values loses bits
        return F.cross_entropy(logits, images.long(), reduction="none")

    def log_prob(self, images: torch.Tensor) -> torch.Tensor:
        """Returns the exact log-likelihood log p(x) of each image, in nats, shape (N,)."""
        return -self.nll_nats_per_subpixel(images).flatten(1).sum(dim=1)

    def bits_per_dim(self, images: torch.Tensor) -> torch.Tensor:
        """Returns -log2 p(x) / (C*H*W) per image, shape (N,)."""
        return nll_to_bits_per_dim(-self.log_prob(images), images.shape[1:])

    def nll_map(self, images: torch.Tensor) -> torch.Tensor:
        """Returns the per-pixel negative log-likelihood in bits, summed over channels, (N, H, W).

        Its mean over pixels divided by C equals `bits_per_dim`; bright spots show what the model
        found surprising in an image.
        """
        return self.nll_nats_per_subpixel(images).sum(dim=1) / math.log(2)


def nll_to_bits_per_dim(nll_nats: torch.Tensor, image_shape: torch.Size) -> torch.Tensor:
    """Converts a per-image negative log-likelihood in nats to bits per sub-pixel.

    Args:
        nll_nats: (N,) negative log-likelihoods in nats.
        image_shape: (C, H, W) of the images.

    Returns:
        (N,) bits/dim = nll_nats / (C*H*W*ln 2).
    """
    num_dims = math.prod(image_shape)
    return nll_nats / (num_dims * math.log(2))
