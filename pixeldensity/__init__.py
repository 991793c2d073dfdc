"""pixeldensity: autoregressive image density models (PixelCNN, Row LSTM, Diagonal BiLSTM).

The model library of the project: models and their registry, exact likelihood and bits/dim,
sampling, checkpoints, and the per-image outlier scores built on them. It needs only torch to
import (Pillow and numpy are imported by the modules that decode or score images); it never
imports Apache Beam, which lives in `transforms` and `pipelines`.
"""

from pixeldensity.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from pixeldensity.model import DensityModel, ModelConfig, nll_to_bits_per_dim
from pixeldensity.registry import build_model, create_model, get_config, list_models
from pixeldensity.sampling import complete, sample

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DensityModel",
    "ModelConfig",
    "build_model",
    "complete",
    "create_model",
    "get_config",
    "list_models",
    "load_checkpoint",
    "nll_to_bits_per_dim",
    "sample",
    "save_checkpoint",
]
