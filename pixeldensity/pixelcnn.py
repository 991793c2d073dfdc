"""PixelCNN (van den Oord et al., 2016, "Pixel Recurrent Neural Networks", section 3.4).

A stack of residual blocks of masked convolutions on top of the shared skeleton in `model.py`.
Each block is the paper's bottleneck: 1x1 down to half width, a 3x3 mask-B convolution, 1x1 back
up, with ReLUs in between and the input added back. Every convolution is masked so that colour
groups stay causal (R -> G -> B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pixeldensity.layers import MaskedConv2d
from pixeldensity.model import DensityModel


class PixelCNNBlock(nn.Module):
    """Residual bottleneck block: x + 1x1(relu(3x3(relu(1x1(relu(x)))))), all mask B.

    Args:
        hidden_channels: feature maps in and out (h = hidden_channels // 2 inside).
        num_channels: image channels the features are grouped by.
        kernel_size: size of the middle masked convolution.
    """

    def __init__(self, hidden_channels: int, num_channels: int, kernel_size: int = 3):
        super().__init__()
        inner = hidden_channels // 2
        self.reduce = MaskedConv2d(
            hidden_channels, inner, 1, mask_type="B", num_channels=num_channels
        )
        self.conv = MaskedConv2d(
            inner, inner, kernel_size, mask_type="B", num_channels=num_channels
        )
        self.expand = MaskedConv2d(
            inner, hidden_channels, 1, mask_type="B", num_channels=num_channels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps (N, hidden, H, W) features to features of the same shape."""
        h = self.reduce(F.relu(x))
        h = self.conv(F.relu(h))
        return x + self.expand(F.relu(h))


class PixelCNN(DensityModel):
    """PixelCNN: 7x7 mask-A input, residual masked-convolution blocks, 256-way softmax head."""

    def make_layer(self) -> nn.Module:
        return PixelCNNBlock(self.config.hidden_channels, self.config.in_channels)
