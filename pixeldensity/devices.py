"""Device choice and mixed precision, shared by training and scoring.

The rules: "auto" means CUDA when a GPU is visible and the CPU otherwise; autocast is used only
on CUDA, because bfloat16 on a CPU without AVX-512 BF16 runs 35-500 times slower than float32.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Returns the torch device for `device`: "auto", "cpu", "cuda" or "cuda:N".

    Raises:
        ValueError: CUDA was asked for but no GPU is visible.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but no CUDA GPU is visible")
    return resolved


def autocast(device: torch.device, precision: str = "none") -> contextlib.AbstractContextManager:
    """Returns an autocast context for `precision` ("none", "bf16" or "fp16") on `device`.

    On the CPU the context is always a no-op (with a warning when a half precision was asked
    for), so the same code runs everywhere.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}, got {precision!r}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type != "cuda":
        logger.warning("precision %s ignored on %s: autocast runs only on CUDA", precision, device)
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)
