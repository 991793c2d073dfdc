"""Row LSTM and Diagonal BiLSTM (van den Oord et al., 2016, "Pixel Recurrent Neural Networks").

Both are residual layers on top of the shared skeleton in `model.py`. Their input-to-state
convolutions are masked (mask B), so the gates of a colour group only see the channels allowed to
it; their state-to-state convolutions read only pixels that are entirely in the past (the row
above, or the column to the left after skewing), so they need no mask.

Tensor names: `features` (N, F, H, W) are the layer's input and output, `gates` hold the four
LSTM pre-activations stacked on the channel axis in the order (input, forget, output, cell).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pixeldensity.layers import MaskedConv2d, channel_groups
from pixeldensity.model import DensityModel


def lstm_step(gates: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM update from pre-activations `gates` (N, 4F, ...) and the cell state (N, F, ...).

    Returns:
        (hidden, cell), each (N, F, ...). Sigmoid for the input, forget and output gates, tanh for
        the cell candidate, as in the paper's equation (3).
    """
    input_gate, forget_gate, output_gate, candidate = gates.chunk(4, dim=1)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
    hidden = torch.sigmoid(output_gate) * torch.tanh(cell)
    return hidden, cell


def gate_groups(hidden_channels: int, num_channels: int) -> torch.Tensor:
    """Colour groups of the 4*hidden gate channels: each gate repeats the hidden grouping."""
    return channel_groups(hidden_channels, num_channels).repeat(4)


class RowLSTMLayer(nn.Module):
    """A residual Row LSTM layer: processes the image one row at a time, top to bottom.

    The input-to-state map is a masked 1 x k convolution along the row (the current pixel's
    allowed channels and the k // 2 pixels to its left); the state-to-state map is an unmasked
    1-D convolution of width k over the previous row's hidden state. The receptive field is a
    triangle above the pixel, as in the paper.

    Args:
        hidden_channels: features F in and out.
        num_channels: image channels the features are grouped by.
        kernel_size: k, the width of both convolutions (3 in the paper).
    """

    def __init__(self, hidden_channels: int, num_channels: int, kernel_size: int = 3):
        super().__init__()
        self.input_to_state = MaskedConv2d(
            hidden_channels,
            4 * hidden_channels,
            (1, kernel_size),
            mask_type="B",
            num_channels=num_channels,
            out_groups=gate_groups(hidden_channels, num_channels),
        )
        self.state_to_state = nn.Conv1d(
            hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2
        )
        self.output_conv = MaskedConv2d(
            hidden_channels, hidden_channels, 1, mask_type="B", num_channels=num_channels
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Maps (N, F, H, W) features to features of the same shape."""
        batch, channels, height, width = features.shape
        input_gates = self.input_to_state(features)  # (N, 4F, H, W)

        hidden = features.new_zeros(batch, channels, width)
        cell = features.new_zeros(batch, channels, width)
        rows = []
        for row in range(height):
            gates = input_gates[:, :, row] + self.state_to_state(hidden)  # (N, 4F, W)
            hidden, cell = lstm_step(gates, cell)
            rows.append(hidden)

        hidden_map = torch.stack(rows, dim=2)  # (N, F, H, W)
        return features + self.output_conv(hidden_map)


def skew(x: torch.Tensor) -> torch.Tensor:
    """Shifts row r of (N, F, H, W) right by r, giving (N, F, H, W + H - 1), zero elsewhere.

    After skewing, each column holds one anti-diagonal of the image, so a left-to-right scan over
    columns visits pixels so that both the left and the upper neighbour are already computed.
    """
    batch, channels, height, width = x.shape
    padded = F.pad(x, (0, height))  # rows of length W + H
    flat = padded.reshape(batch, channels, height * (width + height))
    flat = flat[:, :, : height * (width + height - 1)]
    return flat.reshape(batch, channels, height, width + height - 1)


def unskew(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `skew`: (N, F, H, W + H - 1) back to (N, F, H, W)."""
    batch, channels, height, skewed_width = x.shape
    width = skewed_width - height + 1
    flat = x.reshape(batch, channels, height * skewed_width)
    flat = F.pad(flat, (0, height))
    return flat.reshape(batch, channels, height, width + height)[:, :, :, :width]


class DiagonalLSTM(nn.Module):
    """One direction of the Diagonal BiLSTM: scans the skewed map column by column.

    The input-to-state map is a 1x1 mask-B convolution; the state-to-state map is a 2x1
    convolution over the previous column's hidden state, combining rows r-1 and r, i.e. the pixel
    above and the pixel to the left in image coordinates.

    Args:
        hidden_channels: features F in and out.
        num_channels: image channels the features are grouped by.
    """

    def __init__(self, hidden_channels: int, num_channels: int):
        super().__init__()
        self.input_to_state = MaskedConv2d(
            hidden_channels,
            4 * hidden_channels,
            1,
            mask_type="B",
            num_channels=num_channels,
            out_groups=gate_groups(hidden_channels, num_channels),
        )
        self.state_to_state = nn.Conv1d(hidden_channels, 4 * hidden_channels, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Maps (N, F, H, W) features to the hidden state map (N, F, H, W)."""
        batch, channels, height, _ = features.shape
        input_gates = skew(self.input_to_state(features))  # (N, 4F, H, W + H - 1)

        hidden = features.new_zeros(batch, channels, height)
        cell = features.new_zeros(batch, channels, height)
        columns = []
        for column in range(input_gates.shape[-1]):
            # Padding one row on top lets row r read rows r-1 and r of the previous column.
            state_gates = self.state_to_state(F.pad(hidden, (1, 0)))  # (N, 4F, H)
            hidden, cell = lstm_step(input_gates[..., column] + state_gates, cell)
            columns.append(hidden)

        return unskew(torch.stack(columns, dim=-1))


class DiagonalBiLSTMLayer(nn.Module):
    """A residual Diagonal BiLSTM layer: two diagonal scans, one of them on the mirrored image.

    The mirrored scan sees the pixel to the right of the current one, which is the future, so its
    output is shifted down by one row before the two are added: pixel (r, c) then receives the
    right-to-left state of (r-1, c), which depends only on rows up to r-1.

    Args:
        hidden_channels: features F in and out.
        num_channels: image channels the features are grouped by.
    """

    def __init__(self, hidden_channels: int, num_channels: int):
        super().__init__()
        self.forward_lstm = DiagonalLSTM(hidden_channels, num_channels)
        self.backward_lstm = DiagonalLSTM(hidden_channels, num_channels)
        self.output_conv = MaskedConv2d(
            hidden_channels, hidden_channels, 1, mask_type="B", num_channels=num_channels
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Maps (N, F, H, W) features to features of the same shape."""
        left_to_right = self.forward_lstm(features)
        right_to_left = self.backward_lstm(features.flip(-1)).flip(-1)
        right_to_left = F.pad(right_to_left, (0, 0, 1, 0))[:, :, :-1]  # shift down one row
        return features + self.output_conv(left_to_right + right_to_left)


class RowLSTM(DensityModel):
    """PixelRNN with Row LSTM layers."""

    def make_layer(self) -> nn.Module:
        return RowLSTMLayer(self.config.hidden_channels, self.config.in_channels)


class DiagonalBiLSTM(DensityModel):
    """PixelRNN with Diagonal BiLSTM layers."""

    def make_layer(self) -> nn.Module:
        return DiagonalBiLSTMLayer(self.config.hidden_channels, self.config.in_channels)
