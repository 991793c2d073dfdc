"""Checkpoints: a directory holding `model.safetensors` (weights) and `config.json` (the rest).

`config.json` carries everything needed to rebuild and use the model without the code that trained
it: the format version, the architecture config, the image shape, the number of levels, a model
id, the SHA-256 of the weights file, a training summary and a calibration block (null until
`pipelines.calibrate` fills it). Loading never unpickles anything, and every way a checkpoint can
be broken (missing file, invalid JSON, edited or truncated weights, tensors that do not fit the
config) ends in a `CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pixeldensity.model import DensityModel, ModelConfig
from pixeldensity.registry import build_model

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match its own configuration."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the model, in eval mode, on the requested device.
        image_shape: (C, H, W) the model was trained at.
        model_id: a stable id, "<name>-<first 12 hex digits of the weights' SHA-256>".
        training: the training summary written by the trainer (free-form dict).
        calibration: the calibration block, or None before calibration.
        path: the checkpoint directory.
    """

    model: DensityModel
    image_shape: tuple[int, int, int]
    model_id: str
    training: dict[str, Any]
    calibration: dict[str, Any] | None
    path: Path


def save_checkpoint(
    directory: str | os.PathLike,
    model: DensityModel,
    *,
    image_shape: tuple[int, int, int],
    name: str = "model",
    training: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> Path:
    """Writes `model` to `directory` (created if needed); returns the directory.

    Both files are written to temporary names first and renamed into place, so a crash while
    saving leaves the previous checkpoint intact.

    Args:
        directory: where to write `model.safetensors` and `config.json`.
        model: the model to save; its weights are saved in float32 on the CPU.
        image_shape: (C, H, W) of the training images.
        name: a short name that starts the model id, e.g. "fashion_mnist_pixelcnn".
        training: a JSON-safe training summary (steps, validation bits/dim, data, command).
        calibration: a JSON-safe calibration block, see `pixeldensity.calibration`.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _check_image_shape(image_shape, model.config)

    weights = {
        key: value.detach().float().cpu().contiguous() for key, value in model.state_dict().items()
    }
    weights_path = directory / WEIGHTS_FILE
    temporary_weights = weights_path.with_suffix(".tmp")
    save_file(weights, str(temporary_weights))
    weights_sha256 = _sha256(temporary_weights)

    config = {
        "format_version": FORMAT_VERSION,
        "model_id": f"{name}-{weights_sha256[:12]}",
        "model_config": model.config.to_dict(),
        "image_shape": list(image_shape),
        "num_levels": model.config.num_levels,
        "weights_sha256": weights_sha256,
        "training": training or {},
        "calibration": calibration,
    }
    _write_json(directory / CONFIG_FILE, config)
    os.replace(temporary_weights, weights_path)
    return directory


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Loads a checkpoint directory (or either of its two files) without unpickling anything.

    Args:
        path: the checkpoint directory, or the path of its `config.json` or `model.safetensors`.
        device: where to place the model.

    Returns:
        A `Checkpoint` whose model is in eval mode.

    Raises:
        CheckpointError: a file is missing, unreadable, edited, truncated or does not fit.
    """
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    config = read_checkpoint_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: weights file is missing")

    digest = _sha256(weights_path)
    if digest != config["weights_sha256"]:
        raise CheckpointError(
            f"{weights_path}: SHA-256 {digest[:12]}... does not match the "
            f"{config['weights_sha256'][:12]}... recorded in {CONFIG_FILE}; the weights were "
            "edited, truncated or belong to another checkpoint"
        )

    model = build_model(ModelConfig.from_dict(config["model_config"]))
    model.load_state_dict(_read_weights(weights_path, model))
    model.to(device).eval()
    return Checkpoint(
        model=model,
        image_shape=tuple(config["image_shape"]),
        model_id=config["model_id"],
        training=config["training"],
        calibration=config["calibration"],
        path=directory,
    )


def read_checkpoint_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates `config.json` of a checkpoint directory; returns it as a dict."""
    config_path = Path(directory) / CONFIG_FILE
    if not Path(directory).exists():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: checkpoint config is missing")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error})") from None

    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        version = config.get("format_version") if isinstance(config, dict) else None
        raise CheckpointError(
            f"{config_path}: format_version {version!r} is not supported; "
            f"this version of pixeldensity reads {FORMAT_VERSION}"
        )
    required = ("model_id", "model_config", "image_shape", "weights_sha256", "training")
    missing = [key for key in required if key not in config]
    if missing:
        raise CheckpointError(f"{config_path}: missing keys {missing}")
    try:
        model_config = ModelConfig.from_dict(config["model_config"])
        _check_image_shape(tuple(config["image_shape"]), model_config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: invalid model config ({error})") from None
    config.setdefault("calibration", None)
    return config


def update_calibration(directory: str | os.PathLike, calibration: dict[str, Any]) -> None:
    """Replaces the calibration block of the checkpoint in `directory`, leaving weights alone."""
    config = read_checkpoint_config(directory)
    config["calibration"] = calibration
    _write_json(Path(directory) / CONFIG_FILE, config)


def _read_weights(weights_path: Path, model: DensityModel) -> dict[str, torch.Tensor]:
    """Reads the safetensors file and checks names and shapes against `model`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({error})") from None

    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: tensors do not match the model config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for key, tensor in weights.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{weights_path}: tensor {key} has shape {tuple(tensor.shape)}, "
                f"the model config needs {tuple(expected[key].shape)}"
            )
    return weights


def _check_image_shape(image_shape: tuple[int, ...], config: ModelConfig) -> None:
    if len(image_shape) != 3 or any(int(size) < 1 for size in image_shape):
        raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {image_shape}")
    if image_shape[0] != config.in_channels:
        raise ValueError(
            f"image_shape has {image_shape[0]} channels but the model takes {config.in_channels}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, values: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
