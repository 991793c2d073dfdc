"""Masked convolutions: the building block that makes a convolutional network autoregressive.

A sub-pixel (i, j, c) may depend on every pixel before (i, j) in raster order and, inside pixel
(i, j) itself, on the channels before c in the order R -> G -> B (van den Oord et al., 2016,
"Pixel Recurrent Neural Networks", section 3.4). Feature maps are split into C contiguous groups,
one per image channel; a mask decides which input groups each output group may read at the
centre tap. Mask "A" (first layer) forbids a channel from reading itself, mask "B" (every later
layer) allows it, because by then a group-c feature holds only what channel c was allowed to see.

The recurrent layers and the model skeleton live in `pixelrnn.py`, `pixelcnn.py` and `model.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_TYPES = ("A", "B")


def channel_groups(num_features: int, num_channels: int) -> torch.Tensor:
    """Assigns each of `num_features` feature maps to one of `num_channels` colour groups.

    Args:
        num_features: number of feature maps; at least `num_channels`, so no group is empty.
        num_channels: number of image channels C (1 or 3).

    Returns:
        A long tensor of shape (num_features,): feature f belongs to group
        `f * num_channels // num_features`, so groups are contiguous blocks (R first) of as
        equal a size as the width allows.
    """
    if num_features < num_channels:
        raise ValueError(
            f"num_features must be at least the image channels ({num_channels}), got {num_features}"
        )
    return torch.arange(num_features) * num_channels // num_features


def causal_mask(
    out_groups: torch.Tensor,
    in_groups: torch.Tensor,
    kernel_size: tuple[int, int],
    mask_type: str,
) -> torch.Tensor:
    """Builds the 0/1 mask of a masked convolution kernel.

    Args:
        out_groups: (out_channels,) colour group of each output feature.
        in_groups: (in_channels,) colour group of each input feature.
        kernel_size: (kh, kw), both odd; the centre tap is the current pixel.
        mask_type: "A" (a group may read strictly earlier groups at the centre) or "B" (earlier
            groups and its own).

    Returns:
        A float tensor (out_channels, in_channels, kh, kw): 1 where the weight may be non-zero.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    kernel_height, kernel_width = kernel_size
    if kernel_height % 2 == 0 or kernel_width % 2 == 0:
        raise ValueError(f"kernel_size must be odd in both dimensions, got {kernel_size}")
    centre_row, centre_col = kernel_height // 2, kernel_width // 2

    mask = torch.zeros(len(out_groups), len(in_groups), kernel_height, kernel_width)
    mask[:, :, :centre_row, :] = 1  # every row above the current one
    mask[:, :, centre_row, :centre_col] = 1  # pixels to the left in the current row

    if mask_type == "A":
        centre = out_groups[:, None] > in_groups[None, :]
    else:
        centre = out_groups[:, None] >= in_groups[None, :]
    mask[:, :, centre_row, centre_col] = centre.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A 2-D convolution whose kernel cannot see the current or later sub-pixels.

    Shape-preserving ("same" padding, stride 1). Input features are grouped by colour with
    `channel_groups(in_channels, num_channels)`; output features likewise, unless
    `out_groups` gives the grouping explicitly (the LSTM gates repeat the hidden grouping).

    Args:
        in_channels: input feature maps.
        out_channels: output feature maps.
        kernel_size: an odd int or (kh, kw) pair of odd ints.
        mask_type: "A" or "B", see the module docstring.
        num_channels: image channels C the features are grouped by.
        out_groups: optional (out_channels,) explicit grouping of the outputs.
        bias: whether to add a learned bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        mask_type: str,
        num_channels: int,
        out_groups: torch.Tensor | None = None,
        bias: bool = True,
    ):
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size, kernel_size)
        padding = (kernel_size[0] // 2, kernel_size[1] // 2)
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)

        if out_groups is None:
            out_groups = channel_groups(out_channels, num_channels)
        in_groups = channel_groups(in_channels, num_channels)
        mask = causal_mask(out_groups, in_groups, kernel_size, mask_type)
        self.register_buffer("mask", mask, persistent=False)
        self.mask_type = mask_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolves `x` (N, in_channels, H, W) with the masked kernel; returns (N, out, H, W)."""
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type}"
