"""Score decoded images with a density model: `ScoreImages` and its RunInference model handler.

`DensityModelHandler` is a Beam `ModelHandler` for `pixeldensity` checkpoints. RunInference
loads the model once per worker process through Beam's shared handle and hands it batches of
`Decoded` images; the handler turns each batch into one result per image:

- `Scored`: bits/dim under the model (and under the background model, if one is configured)
  and the compressor bits/dim of the very same uint8 tensor the model scored;
- `ScoreError`: an error row, when the image does not fit the checkpoint (reason
  "shape_mismatch" or "value_out_of_range"), when the model raised on it ("inference_failed")
  or returned a NaN or infinite score ("non_finite_score").

A failing batch is split in halves, recursively, until the failing images are alone, so one bad
image costs its own row and never its neighbours' scores. (`RunInference`'s own exception
handling would send the whole batch to its failure output instead.)

Checkpoints are read from local paths, or from any filesystem Beam knows (gs://, s3://): the
two checkpoint files are then copied into a local temporary directory once per process.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import torch
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from pixeldensity.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint
from pixeldensity.checkpoint import read_checkpoint_config as _read_local_config
from pixeldensity.devices import AUTOCAST_DTYPES, autocast, resolve_device
from pixeldensity.model import DensityModel
from pixeldensity.scores import COMPRESSORS, DEFAULT_COMPRESSOR, complexity_bits_per_dim
from transforms.schema import (
    REASON_INFERENCE_FAILED,
    REASON_NON_FINITE_SCORE,
    REASON_SHAPE_MISMATCH,
    REASON_VALUE_OUT_OF_RANGE,
)
from transforms.types import METRICS_NAMESPACE, Decoded, ErrorRow, file_facts

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "CheckpointInfo",
    "DensityModelHandler",
    "ScoreError",
    "ScoreImages",
    "Scored",
    "load_count",
    "read_checkpoint_info",
]

DEFAULT_BATCH_SIZE = 64

# Output tags of `ScoreImages`.
SCORED_TAG = "scored"
ERRORS_TAG = "errors"

# Models loaded by `DensityModelHandler.load_model` in this process; see `load_count`.
_load_count = 0
_load_count_lock = threading.Lock()


def load_count() -> int:
    """Returns how many times this process has loaded a checkpoint for scoring.

    RunInference loads once per worker process and shares the model between the bundles and
    threads of that process; this count lets tests (and people reading logs) check that.
    Across processes, the Beam counter `model_loads` (namespace "pixeldensity") sums the loads
    that went on to score a batch (a process that loaded but got no work is not counted).
    """
    return _load_count


@dataclasses.dataclass(frozen=True)
class Scored:
    """Model outputs for one image, with the sample's identity and file facts.

    Attributes:
        shard: Path or URL of the shard.
        key: The sample key.
        member: Extension of the image member scored, e.g. "png".
        original_width: Width of the file as stored, pixels.
        original_height: Height of the file as stored, pixels.
        original_mode: Pillow mode of the file.
        original_format: Pillow format of the file.
        is_animated: Whether the file holds more than one frame.
        num_frames: Frames in the file.
        bits_per_dim: -log2 p(image) / (C*H*W) under the model.
        complexity_bits_per_dim: Compressor code length of the same tensor, bits per sub-pixel.
        background_bits_per_dim: Bits/dim under the background model, or None without one.
        model_id: Id of the checkpoint that scored.
    """

    shard: str
    key: str
    member: str
    original_width: int
    original_height: int
    original_mode: str
    original_format: str
    is_animated: bool
    num_frames: int
    bits_per_dim: float
    complexity_bits_per_dim: float
    background_bits_per_dim: float | None
    model_id: str


@dataclasses.dataclass(frozen=True)
class ScoreError(ErrorRow):
    """An `ErrorRow` of the scoring stage, which still knows the file facts of the image.

    Attributes:
        original_width: Width of the file as stored, pixels.
        original_height: Height of the file as stored, pixels.
        original_mode: Pillow mode of the file.
        original_format: Pillow format of the file.
        is_animated: Whether the file holds more than one frame.
        num_frames: Frames in the file.
    """

    original_width: int | None = None
    original_height: int | None = None
    original_mode: str | None = None
    original_format: str | None = None
    is_animated: bool | None = None
    num_frames: int | None = None

    @classmethod
    def of(cls, decoded: Decoded, reason: str, message: str) -> ScoreError:
        """Builds the error row of `decoded`, keeping its identity and file facts."""
        return cls(
            shard=decoded.shard,
            key=decoded.key,
            member=decoded.member,
            reason=reason,
            message=message,
            **file_facts(decoded),
        )


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a pipeline needs to know about a checkpoint before any worker loads it.

    Attributes:
        path: The checkpoint directory, local path or URL.
        model_id: The checkpoint's id, e.g. "fashion_mnist_pixelcnn-0123456789ab".
        image_shape: (C, H, W) the model scores.
        num_levels: Values per sub-pixel (256 for 8-bit images).
        calibration: The calibration block, or None before calibration.
    """

    path: str
    model_id: str
    image_shape: tuple[int, int, int]
    num_levels: int
    calibration: dict[str, Any] | None


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, "file")


def _checkpoint_directory(path: str) -> str:
    """Returns the directory of a checkpoint given as its directory or one of its two files."""
    stripped = path.rstrip("/")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if stripped.endswith("/" + name) or stripped == name:
            return stripped[: -len(name)].rstrip("/") or "."
    return stripped


def _copy_files(directory: str, names: Iterable[str]) -> Path:
    """Copies `names` from a Beam filesystem directory into a new local temporary directory."""
    local = Path(tempfile.mkdtemp(prefix="pixeldensity-checkpoint-"))
    for name in names:
        source = FileSystems.join(directory, name)
        with FileSystems.open(source) as reader, open(local / name, "wb") as writer:
            shutil.copyfileobj(reader, writer, length=1 << 20)
    return local


def read_checkpoint_info(checkpoint: str | os.PathLike) -> CheckpointInfo:
    """Reads a checkpoint's `config.json` (not its weights) from a local path or a URL.

    Args:
        checkpoint: The checkpoint directory, or the path of one of its two files.

    Returns:
        The checkpoint's id, image shape, number of levels and calibration block.

    Raises:
        pixeldensity.CheckpointError: The config is missing or invalid.
    """
    directory = _checkpoint_directory(os.fspath(checkpoint))
    if _is_local(directory):
        config = _read_local_config(directory)
    else:
        local = _copy_files(directory, [CONFIG_FILE])
        try:
            config = _read_local_config(local)
        finally:
            shutil.rmtree(local, ignore_errors=True)
    return CheckpointInfo(
        path=directory,
        model_id=config["model_id"],
        image_shape=tuple(int(size) for size in config["image_shape"]),
        num_levels=int(config["model_config"]["num_levels"]),
        calibration=config["calibration"],
    )


def _load_model(checkpoint: str, device: torch.device) -> tuple[DensityModel, str]:
    """Loads a checkpoint's model onto `device`; returns (model, model_id)."""
    if _is_local(checkpoint):
        loaded = load_checkpoint(checkpoint, device=device)
    else:
        local = _copy_files(checkpoint, [CONFIG_FILE, WEIGHTS_FILE])
        try:
            loaded = load_checkpoint(local, device=device)
        finally:
            shutil.rmtree(local, ignore_errors=True)
    return loaded.model, loaded.model_id


class _LoadedModels:
    """The models of one worker process, as RunInference's shared handle keeps them.

    A plain class rather than a tuple: Beam's shared handle holds a weak reference to it.

    Attributes:
        model: The density model, in eval mode.
        background: The background model, or None.
        device: Where both models live.
        precision: Autocast precision actually used ("none" on the CPU).
        image_shape: (C, H, W) the model scores.
        num_levels: Values per sub-pixel.
        model_id: Id of the model's checkpoint.
    """

    def __init__(
        self,
        model: DensityModel,
        background: DensityModel | None,
        *,
        device: torch.device,
        precision: str,
        image_shape: tuple[int, int, int],
        model_id: str,
    ):
        self.model = model
        self.background = background
        self.device = device
        self.precision = precision
        self.image_shape = image_shape
        self.num_levels = model.config.num_levels
        self.model_id = model_id
        # One forward pass at a time per process: Beam runs several bundles in threads, and
        # concurrent passes would only contend for the same cores or the same GPU memory.
        self.forward_lock = threading.Lock()
        self._load_reported = False
        self._lock = threading.Lock()

    def report_load_once(self) -> bool:
        """Returns True the first time it is called for this load, False afterwards."""
        with self._lock:
            first, self._load_reported = not self._load_reported, True
            return first


class DensityModelHandler(ModelHandler[Decoded, Scored | ScoreError, _LoadedModels]):
    """RunInference model handler for `pixeldensity` checkpoints.

    It pickles small: it holds paths and settings only, and each worker loads the weights in
    `load_model`. Results come back one per input image, in input order, as `Scored` or
    `ScoreError` (see the module docstring).

    Args:
        checkpoint: Checkpoint directory (local path or URL).
        image_shape: (C, H, W) of the checkpoint, see `read_checkpoint_info`.
        model_id: Id of the checkpoint, recorded in every `Scored`.
        background_checkpoint: Background-model checkpoint for the likelihood ratio, same
            image shape; None for none.
        device: "auto" (CUDA when visible, else CPU), "cpu", "cuda" or "cuda:N".
        precision: Autocast precision on CUDA: "none", "bf16" or "fp16". Ignored on the CPU,
            where bfloat16 is many times slower than float32.
        compressor: Compressor of the complexity score, one of `pixeldensity.scores.COMPRESSORS`.
        min_batch_size: Smallest batch RunInference should form (not guaranteed: the last
            batch of a bundle is smaller).
        max_batch_size: Largest batch RunInference forms.
        num_threads: `torch.set_num_threads` for each worker process, or None to keep
            torch's default. Set 1 when several worker processes share a machine's cores.
    """

    def __init__(
        self,
        checkpoint: str,
        *,
        image_shape: tuple[int, int, int],
        model_id: str,
        background_checkpoint: str | None = None,
        device: str = "auto",
        precision: str = "none",
        compressor: str = DEFAULT_COMPRESSOR,
        min_batch_size: int = 1,
        max_batch_size: int = DEFAULT_BATCH_SIZE,
        num_threads: int | None = None,
    ):
        _check_settings(device, precision, compressor, min_batch_size, max_batch_size)
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be None or at least 1, got {num_threads}")
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
        self._checkpoint = checkpoint
        self._background_checkpoint = background_checkpoint
        self._image_shape = tuple(image_shape)
        self._model_id = model_id
        self._device = device
        self._precision = precision
        self._compressor = compressor
        self._num_threads = num_threads

    def load_model(self) -> _LoadedModels:
        """Loads the model (and background model) onto the device; called once per process."""
        global _load_count
        start = time.perf_counter()
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        device = resolve_device(self._device)
        precision = self._precision
        if device.type != "cuda" and precision != "none":
            logger.warning(
                "precision %s ignored on %s: autocast runs only on CUDA", precision, device
            )
            precision = "none"

        model, model_id = _load_model(self._checkpoint, device)
        background = None
        if self._background_checkpoint is not None:
            background, _ = _load_model(self._background_checkpoint, device)

        with _load_count_lock:
            _load_count += 1
        logger.info(
            "loaded %s on %s (precision %s, %d torch threads) in %.0f ms, process %d",
            model_id,
            device,
            precision,
            torch.get_num_threads(),
            (time.perf_counter() - start) * 1e3,
            os.getpid(),
        )
        return _LoadedModels(
            model,
            background,
            device=device,
            precision=precision,
            image_shape=self._image_shape,
            model_id=model_id,
        )

    def run_inference(
        self,
        batch: Sequence[Decoded],
        model: _LoadedModels,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[Scored | ScoreError]:
        """Scores a batch of decoded images; returns one result per image, in order.

        Args:
            batch: `Decoded` elements whose images are uint8 (C, H, W).
            model: What `load_model` returned.
            inference_args: Not supported; must be None or empty.

        Returns:
            A list with a `Scored` or a `ScoreError` for every element of `batch`.
        """
        if model.report_load_once():
            Metrics.counter(METRICS_NAMESPACE, "model_loads").inc()

        results: list[Scored | ScoreError | None] = [None] * len(batch)
        fitting = []
        for index, element in enumerate(batch):
            results[index] = _check_image(element, model.image_shape, model.num_levels)
            if results[index] is None:
                fitting.append(index)
        if not fitting:
            return results

        images = np.stack([batch[index].image for index in fitting])  # (N, C, H, W) uint8
        outputs = self._score_bisecting(images, model)
        for position, index in enumerate(fitting):
            results[index] = self._result(batch[index], images[position], outputs[position])
        return results

    def get_num_bytes(self, batch: Sequence[Decoded]) -> int:
        """Returns the bytes of the batch's image arrays (elements times element size)."""
        return sum(element.image.size * element.image.itemsize for element in batch)

    def get_metrics_namespace(self) -> str:
        """Returns "pixeldensity": RunInference's own metrics join the pipeline's."""
        return METRICS_NAMESPACE

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        """Rejects inference args: the models take none."""
        if inference_args:
            raise ValueError(f"inference_args are not supported, got {sorted(inference_args)}")

    def _forward(self, images: np.ndarray, model: _LoadedModels) -> list[tuple]:
        """Runs the model(s) on (N, C, H, W) uint8 images; returns (bits/dim, background) pairs."""
        tensor = torch.from_numpy(images).to(model.device)
        with model.forward_lock, torch.inference_mode(), autocast(model.device, model.precision):
            bits_per_dim = model.model.bits_per_dim(tensor).float().cpu().tolist()  # (N,)
            if model.background is None:
                return [(value, None) for value in bits_per_dim]
            background = model.background.bits_per_dim(tensor).float().cpu().tolist()
        return list(zip(bits_per_dim, background, strict=True))

    def _score_bisecting(self, images: np.ndarray, model: _LoadedModels) -> list:
        """Like `_forward`, but splits a failing batch until each failure is one image.

        Returns:
            Per image, a (bits/dim, background bits/dim or None) pair, or the exception
            message (str) of an image that fails on its own.
        """
        try:
            return self._forward(images, model)
        except Exception as error:
            if model.device.type == "cuda":
                torch.cuda.empty_cache()  # an out-of-memory error may pass at half the batch
            if len(images) == 1:
                return [f"{type(error).__name__}: {error}"]
            logger.info("batch of %d failed (%s); splitting it", len(images), type(error).__name__)
        middle = len(images) // 2
        first = self._score_bisecting(images[:middle], model)
        return first + self._score_bisecting(images[middle:], model)

    def _result(self, element: Decoded, image: np.ndarray, output: Any) -> Scored | ScoreError:
        """Builds one image's result from its forward-pass output; `image` is what was scored."""
        if isinstance(output, str):
            logger.warning("inference failed for %s in %s: %s", element.key, element.shard, output)
            return ScoreError.of(element, REASON_INFERENCE_FAILED, output)

        bits_per_dim, background_bits_per_dim = output
        if not math.isfinite(bits_per_dim) or (
            background_bits_per_dim is not None and not math.isfinite(background_bits_per_dim)
        ):
            message = f"bits_per_dim {bits_per_dim}, background {background_bits_per_dim}"
            return ScoreError.of(element, REASON_NON_FINITE_SCORE, message)

        return Scored(
            shard=element.shard,
            key=element.key,
            member=element.member,
            **file_facts(element),
            bits_per_dim=bits_per_dim,
            complexity_bits_per_dim=complexity_bits_per_dim(image, compressor=self._compressor),
            background_bits_per_dim=background_bits_per_dim,
            model_id=self._model_id,
        )


def _check_settings(
    device: str,
    precision: str,
    compressor: str,
    min_batch_size: int,
    max_batch_size: int,
) -> None:
    """Validates handler settings where the pipeline is built, before any worker starts."""
    if device != "auto":
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
            ) from None
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}, got {precision!r}")
    if compressor not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {COMPRESSORS}, got {compressor!r}")
    if not 1 <= min_batch_size <= max_batch_size:
        raise ValueError(
            f"batch sizes must satisfy 1 <= min_batch_size <= max_batch_size, "
            f"got {min_batch_size} and {max_batch_size}"
        )


def _check_image(
    element: Decoded, image_shape: tuple[int, int, int], num_levels: int
) -> ScoreError | None:
    """Returns the error row of an image the model cannot score, or None if it fits."""
    image = element.image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != image_shape:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
        message = f"the model scores uint8 images of shape {image_shape}, got {got}"
        return ScoreError.of(element, REASON_SHAPE_MISMATCH, message)
    if image.size and int(image.max()) >= num_levels:
        message = f"the model takes values 0..{num_levels - 1}, got a maximum of {image.max()}"
        return ScoreError.of(element, REASON_VALUE_OUT_OF_RANGE, message)
    return None


class _SplitResultsFn(beam.DoFn):
    """Sends `Scored` to the main output and `ScoreError` to "errors", counting the errors."""

    def __init__(self):
        self._error_counters = {}

    def process(self, result: Scored | ScoreError):
        if isinstance(result, Scored):
            yield result
            return
        if result.reason not in self._error_counters:
            name = f"score_errors_{result.reason}"
            self._error_counters[result.reason] = Metrics.counter(METRICS_NAMESPACE, name)
        self._error_counters[result.reason].inc()
        yield beam.pvalue.TaggedOutput(ERRORS_TAG, result)


class ScoreImages(beam.PTransform):
    """Scores `Decoded` images with a checkpoint through RunInference.

    Input: a PCollection of `Decoded` (as `DecodeImages` produces under `decoded`).
    Output: tagged outputs `scored`, a PCollection of `Scored`, and `errors`, a PCollection of
    `ScoreError` (an `ErrorRow`). Every input element leaves on exactly one of them. Use
    `result.scored` and `result.errors`.

    Counters (namespace "pixeldensity"): `model_loads` (one per worker process that loaded the
    model and scored with it),
    `score_errors_<reason>`, and RunInference's own (`num_inferences`,
    `inference_batch_latency_micro_secs`, ...).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        background_checkpoint: str | os.PathLike | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        min_batch_size: int | None = None,
        device: str = "auto",
        precision: str = "none",
        compressor: str = DEFAULT_COMPRESSOR,
        num_threads: int | None = None,
    ):
        """Creates the transform; reads the checkpoint configs (not the weights) right away.

        Args:
            checkpoint: Checkpoint directory, local path or URL (gs://...).
            background_checkpoint: Background-model checkpoint for the likelihood-ratio score,
                or None.
            batch_size: Largest batch of images per forward pass.
            min_batch_size: Smallest batch RunInference should form; None means `batch_size`,
                which gives full batches except at the end of each bundle.
            device: "auto", "cpu", "cuda" or "cuda:N"; resolved on each worker.
            precision: "none", "bf16" or "fp16" autocast, on CUDA only.
            compressor: Compressor of `complexity_bits_per_dim`.
            num_threads: torch threads per worker process, or None for torch's default.

        Raises:
            ValueError: A setting is invalid, or the background checkpoint scores another
                image shape.
            pixeldensity.CheckpointError: A checkpoint config is missing or invalid.
        """
        super().__init__()
        info = read_checkpoint_info(checkpoint)
        background = None
        if background_checkpoint is not None:
            background = read_checkpoint_info(background_checkpoint)
            if background.image_shape != info.image_shape:
                raise ValueError(
                    f"background_checkpoint must score the image shape {info.image_shape} of "
                    f"the model, got {background.image_shape}"
                )
        self.info = info
        self.background_info = background
        self._handler = DensityModelHandler(
            info.path,
            image_shape=info.image_shape,
            model_id=info.model_id,
            background_checkpoint=background.path if background else None,
            device=device,
            precision=precision,
            compressor=compressor,
            min_batch_size=batch_size if min_batch_size is None else min_batch_size,
            max_batch_size=batch_size,
            num_threads=num_threads,
        )

    @property
    def background_model_id(self) -> str | None:
        """Id of the background checkpoint, or None without one."""
        return self.background_info.model_id if self.background_info else None

    @property
    def handler(self) -> DensityModelHandler:
        """The model handler given to RunInference."""
        return self._handler

    def expand(self, decoded):
        """Batches, scores and splits the results into `scored` and `errors`."""
        return (
            decoded
            | "RunInference" >> RunInference(self._handler)
            | "SplitErrors"
            >> beam.ParDo(_SplitResultsFn()).with_outputs(ERRORS_TAG, main=SCORED_TAG)
        )
