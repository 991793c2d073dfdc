"""Trains a density model on WebDataset shards, alone or under `torchrun` with DDP.

    python -m pipelines.train --data 'runs/shards/fashion_train-*.tar' \\
        --val-data 'runs/shards/fashion_val-*.tar' --output-dir runs/fashion --steps 2000
    torchrun --standalone --nproc_per_node=2 -m pipelines.train ...   # same options

Training runs by step count: every rank draws exactly one batch per step from its own endless
stream of its own shards (`pipelines.shard_data`), so all ranks make the same number of
collective calls, whatever the shard sizes. `--batch-size` is the global batch; each of W ranks
takes batch_size / W. Gradients are averaged by DistributedDataParallel (gloo on the CPU, NCCL on
GPUs); on CUDA the forward pass runs under autocast (bf16 where supported, else fp16 with a
gradient scaler) with no option needed.

Every `--eval-every` steps rank 0 logs one line,
`step 1200 | train_bpd 3.412 | val_bpd 3.501 | lr 2.0e-04 | 312 ms/step`, and appends a record to
`OUTPUT/metrics.jsonl`. Validation uses the EMA weights, split over ranks by shard. Every
`--checkpoint-every` steps and at the end, rank 0 writes `OUTPUT/checkpoint/`: the EMA model
(`pixeldensity.save_checkpoint`, training summary in its `training` block), the resolved
configuration (`train_config.json`) and `training_state.pt` (weights, EMA, optimiser, step, RNG
states and every rank's data position), written last and atomically.

Resume (`--resume`) is exact: the data position of each rank is (epoch, raw samples drawn in the
epoch) and the stream skips that many samples of the same seeded order; the perturbation noise
is re-seeded from (seed, rank, step) at every step. A resumed run therefore computes the same
steps on the same batches as an uninterrupted one. The output directory must be shared by all
ranks (one file system) for multi-machine resume.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import pixeldensity
from pipelines import shard_data
from pipelines.options import exit_on_user_error
from pixeldensity import devices, training
from pixeldensity.decoding import RESIZE_MODES

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "training_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
PRECISIONS = ("auto", "none", "bf16", "fp16")
STATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is configured by; saved beside the checkpoint.

    Attributes:
        data: shard pattern of the training data (braces, globs, fsspec URLs).
        output_dir: where checkpoints and `metrics.jsonl` go.
        val_data: shard pattern of the validation data; None to skip validation.
        test_data: shard pattern evaluated once at the end (reported, never trained on).
        model: a registered preset (`pixeldensity.list_models()`).
        hidden_channels, num_layers, head_channels: optional preset overrides.
        channels: image channels C (1 or 3).
        image_size: (height, width) the images are decoded to, in pixels.
        resize: the decode policy's resize mode.
        steps: optimisation steps in all.
        batch_size: global batch (images per step over all ranks); divisible by the ranks.
        optimizer: "adam" or "adamw".
        lr: peak learning rate.
        weight_decay: weight decay (L2 for Adam, decoupled for AdamW).
        warmup_steps: steps of linear learning-rate warm-up before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of `lr`.
        clip_norm: clip the gradient norm to this; None for no clipping.
        ema_decay: decay of the weight average used for evaluation and the saved model.
        perturb_rate: fraction of input pixels replaced by uniform noise (background models).
        seed: seeds the weights, the data order and the perturbation noise.
        shuffle_buffer: raw samples in each rank's shuffle buffer.
        eval_every: steps between validation evaluations and log lines.
        max_val_samples: validation images per interval (all ranks together); None for all.
            Each of W ranks reads the first max_val_samples / W images of its validation
            shards, so the subset depends on W. The final evaluation uses every image.
        eval_batch_size: images per evaluation batch and rank.
        checkpoint_every: steps between checkpoints (one is always written at the end).
        device: "auto" (CUDA when visible), "cpu" or "cuda".
        precision: "auto" (bf16/fp16 autocast on CUDA, none on CPU), "none", "bf16", "fp16".
        threads: torch CPU threads per process; None leaves torch's default.
        name: model id prefix of the checkpoint; None uses the output folder's name.
        max_initial_failures: abort when this many samples fail before the first good one.
    """

    data: str
    output_dir: str
    val_data: str | None = None
    test_data: str | None = None
    model: str = "pixelcnn_small"
    hidden_channels: int | None = None
    num_layers: int | None = None
    head_channels: int | None = None
    channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    resize: str = "center_crop"
    steps: int = 1000
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    clip_norm: float | None = 1.0
    ema_decay: float = 0.999
    perturb_rate: float = 0.0
    seed: int = 0
    shuffle_buffer: int = shard_data.DEFAULT_SHUFFLE_BUFFER
    eval_every: int = 200
    max_val_samples: int | None = None
    eval_batch_size: int = 256
    checkpoint_every: int = 500
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    name: str | None = None
    max_initial_failures: int = shard_data.DEFAULT_MAX_INITIAL_FAILURES

    def __post_init__(self):
        positive = ("steps", "batch_size", "eval_every", "eval_batch_size", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")

    def model_overrides(self) -> dict[str, int]:
        """The `ModelConfig` fields this run changes from the preset."""
        overrides = {"in_channels": self.channels}
        for name in ("hidden_channels", "num_layers", "head_channels"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        return overrides


# Fields that must match when resuming: they decide the model, the data order or the schedule.
_RESUME_FIXED_FIELDS = (
    "data",
    "model",
    "hidden_channels",
    "num_layers",
    "head_channels",
    "channels",
    "image_size",
    "resize",
    "steps",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "warmup_steps",
    "min_lr_ratio",
    "clip_norm",
    "ema_decay",
    "perturb_rate",
    "seed",
    "shuffle_buffer",
)


@dataclass
class TrainResult:
    """What a run ended with.

    Attributes:
        checkpoint: the final checkpoint directory.
        steps: steps completed.
        val_bits_per_dim: final validation bits/dim of the EMA model (nan without validation).
        test_bits_per_dim: bits/dim on `test_data` (nan without it).
        seconds: wall-clock training time (validation included, the test evaluation not),
            summed over resumed segments.
        data_stats: rank 0's data counters.
    """

    checkpoint: Path
    steps: int
    val_bits_per_dim: float
    test_bits_per_dim: float
    seconds: float
    data_stats: dict[str, Any]


@dataclass
class _Context:
    """The process's place in the run."""

    rank: int
    world_size: int
    device: torch.device
    precision: str
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _Trainer:
    """The state of one process's training: model, EMA, optimiser, data stream and counters."""

    def __init__(self, config: TrainConfig, context: _Context, command: str):
        self.config, self.context, self.command = config, context, command
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / CHECKPOINT_DIR
        self.step, self.seconds_before = 0, 0.0
        self.val_bits_per_dim = math.nan

        torch.manual_seed(config.seed)
        model_config = pixeldensity.get_config(config.model, **config.model_overrides())
        self.model = pixeldensity.build_model(model_config).to(context.device)
        self.ema = training.ExponentialMovingAverage(self.model, config.ema_decay)
        self.optimizer = training.make_optimizer(
            self.model, config.optimizer, lr=config.lr, weight_decay=config.weight_decay
        )
        use_scaler = context.device.type == "cuda" and context.precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.autocast = devices.autocast(context.device, context.precision)
        self.stats = shard_data.DataStats()
        self.train_shards = _rank_shards(config.data, context)
        self.stream = None

    def restore(self, state: dict[str, Any]) -> None:
        """Loads a training state written by `save` (same world size)."""
        if int(state["world_size"]) != self.context.world_size:
            raise ValueError(
                f"the checkpoint was written by {int(state['world_size'])} processes, this run "
                f"has {self.context.world_size}; resume with the same number of processes"
            )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        training.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.seconds_before = float(state["seconds"])
        self.val_bits_per_dim = float(state["val_bits_per_dim"])
        self.open_stream(state["data_positions"][self.context.rank].tolist())

    def open_stream(self, position: tuple[int, int] = (0, 0)) -> None:
        """Starts this rank's data stream at (epoch, raw position)."""
        config = self.config
        self.stream = shard_data.ShardStream(
            self.train_shards,
            batch_size=config.batch_size // self.context.world_size,
            channels=config.channels,
            size=tuple(config.image_size),
            resize=config.resize,
            seed=config.seed,
            rank=self.context.rank,
            shuffle_buffer=config.shuffle_buffer,
            epoch=int(position[0]),
            position=int(position[1]),
            max_initial_failures=config.max_initial_failures,
            stats=self.stats,
        )

    def train_step(self, ddp_model: torch.nn.Module) -> tuple[float, float]:
        """Takes one step; returns (training bits/dim, learning rate)."""
        config, device = self.config, self.context.device
        lr = training.warmup_cosine_lr(
            self.step,
            base_lr=config.lr,
            warmup_steps=config.warmup_steps,
            total_steps=config.steps,
            min_lr_ratio=config.min_lr_ratio,
        )
        training.set_learning_rate(self.optimizer, lr)
        images = self.stream.next_batch().to(device, non_blocking=True)
        generator = training.step_generator(config.seed, self.context.rank, self.step, device)
        result = training.train_step(
            ddp_model,
            images,
            self.optimizer,
            perturb_rate=config.perturb_rate,
            generator=generator,
            clip_norm=config.clip_norm,
            autocast=self.autocast,
            scaler=self.scaler,
        )
        self.ema.update(self.model)
        self.step += 1
        return result.bits_per_dim, lr

    def evaluate(self, pattern: str | None, max_samples: int | None) -> float:
        """Mean bits/dim of the EMA model on `pattern`'s shards, split over ranks."""
        if pattern is None:
            return math.nan
        context = self.context
        shards = shard_data.list_shards(pattern)[context.rank :: context.world_size]
        per_rank = None if max_samples is None else math.ceil(max_samples / context.world_size)
        batches = shard_data.iter_eval_batches(
            shards,
            batch_size=self.config.eval_batch_size,
            channels=self.config.channels,
            size=tuple(self.config.image_size),
            resize=self.config.resize,
            max_samples=per_rank,
        )
        result = training.evaluate_bits_per_dim(
            self.ema.model, batches, device=context.device, autocast=self.autocast
        )
        totals = _sum_over_ranks([result.sum_bits_per_dim, result.num_images], context)
        return totals[0] / totals[1] if totals[1] else math.nan

    def elapsed_seconds(self, started: float) -> float:
        """Training seconds so far, over all resumed segments."""
        return self.seconds_before + time.monotonic() - started

    def save(self, seconds: float, test_bits_per_dim: float = math.nan) -> None:
        """Writes the checkpoint; every rank must call it (the data positions are gathered)."""
        positions = _gather_positions(self.stream.state(), self.context)
        if not self.context.is_main:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        pixeldensity.save_checkpoint(
            self.checkpoint_dir,
            self.ema.model,
            image_shape=(self.config.channels, *self.config.image_size),
            name=self.config.name or self.output_dir.name,
            training=self.summary(seconds, test_bits_per_dim),
        )
        _write_json(self.checkpoint_dir / TRAIN_CONFIG_FILE, self.resolved_config())
        training.save_training_state(
            self.checkpoint_dir / STATE_FILE, self.state(seconds, positions)
        )

    def state(self, seconds: float, positions: torch.Tensor) -> dict[str, Any]:
        """The training-state dict: plain tensors, numbers and containers only."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "step": self.step,
            "world_size": self.context.world_size,
            "seconds": seconds,
            "val_bits_per_dim": self.val_bits_per_dim,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": training.rng_state(),
            "data_positions": positions,  # (world_size, 2): epoch, raw samples drawn
            "config": _json_safe(dataclasses.asdict(self.config)),
        }

    def summary(self, seconds: float, test_bits_per_dim: float) -> dict[str, Any]:
        """The `training` block of the checkpoint's config.json."""
        config = self.config
        return {
            "steps": self.step,
            "val_bits_per_dim": _finite_or_none(self.val_bits_per_dim),
            "test_bits_per_dim": _finite_or_none(test_bits_per_dim),
            "data": config.data,
            "val_data": config.val_data,
            "test_data": config.test_data,
            "command": self.command,
            "seconds": round(seconds, 1),
            "world_size": self.context.world_size,
            "global_batch_size": config.batch_size,
            "samples_seen": self.step * config.batch_size,
            "model_preset": config.model,
            "perturb_rate": config.perturb_rate,
            "ema_decay": config.ema_decay,
            "data_stats_rank0": self.stats.to_dict(),
        }

    def resolved_config(self) -> dict[str, Any]:
        """The configuration as run: options plus world size, device, precision and command."""
        return {
            **_json_safe(dataclasses.asdict(self.config)),
            "world_size": self.context.world_size,
            "device": str(self.context.device),
            "precision": self.context.precision,
            "command": self.command,
            "model_config": self.model.config.to_dict(),
        }


def run(config: TrainConfig, *, resume: bool = False, command: str | None = None) -> TrainResult:
    """Trains a model as `config` says; see the module docstring.

    Starts a process group when launched by torchrun (WORLD_SIZE > 1 in the environment) and
    tears it down at the end.

    Args:
        config: the run's configuration.
        resume: continue from `output_dir/checkpoint/training_state.pt` when it exists (a run
            without one starts from scratch).
        command: the command line to record in the checkpoint; None records `sys.argv`.

    Returns:
        The final checkpoint and figures (on every rank).

    Raises:
        ValueError: a bad option, a pattern with no shards, or fewer shards than ranks.
        RuntimeError: the data gave no decodable sample (see `pipelines.shard_data`).
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    context = _init_context(config)
    try:
        _check_batch_size(config, context)
        trainer = _Trainer(config, context, command or shlex.join(sys.argv))
        _start_or_resume(trainer, resume)
        return _train(trainer)
    finally:
        if context.owns_process_group:
            dist.destroy_process_group()


def _start_or_resume(trainer: _Trainer, resume: bool) -> None:
    """Restores the saved state when resuming, else opens a fresh stream and metrics file."""
    state_path = trainer.checkpoint_dir / STATE_FILE
    if resume and state_path.is_file():
        state = training.load_training_state(state_path)
        _check_resumable(trainer.config, state, state_path)
        trainer.restore(state)
        logger.info("resumed from %s at step %d", state_path, trainer.step)
    else:
        if resume:
            logger.info("no training state at %s; starting from step 0", state_path)
        trainer.open_stream()
    if trainer.context.is_main:
        trainer.output_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(trainer.output_dir / METRICS_FILE, trainer.step)


def _train(trainer: _Trainer) -> TrainResult:
    """The training loop, from `trainer.step` to `config.steps`, then the final evaluation."""
    config, context = trainer.config, trainer.context
    ddp_model = _wrap_ddp(trainer.model, context)
    started = time.monotonic()
    interval = _Interval()

    with _progress(trainer) as progress:
        while trainer.step < config.steps:
            step_started = time.monotonic()
            bits_per_dim, lr = trainer.train_step(ddp_model)
            interval.add(bits_per_dim, time.monotonic() - step_started, lr)
            progress.update(1)

            final = trainer.step == config.steps
            if trainer.step % config.eval_every == 0 or final:
                max_samples = None if final else config.max_val_samples
                trainer.val_bits_per_dim = trainer.evaluate(config.val_data, max_samples)
                _report(trainer, interval, trainer.elapsed_seconds(started))
                interval = _Interval()
            if trainer.step % config.checkpoint_every == 0 and not final:
                trainer.save(trainer.elapsed_seconds(started))

    # The test evaluation is reported but not counted as training time.
    seconds = trainer.elapsed_seconds(started)
    test_bits_per_dim = trainer.evaluate(config.test_data, None)
    trainer.save(seconds, test_bits_per_dim)
    if context.is_main:
        logger.info(
            "done: %d steps in %.1f min | val_bpd %s | test_bpd %s | checkpoint %s | data %s",
            trainer.step,
            seconds / 60,
            _bpd_text(trainer.val_bits_per_dim, 4),
            _bpd_text(test_bits_per_dim, 4),
            trainer.checkpoint_dir,
            trainer.stats.to_dict(),
        )
    return TrainResult(
        checkpoint=trainer.checkpoint_dir,
        steps=trainer.step,
        val_bits_per_dim=trainer.val_bits_per_dim,
        test_bits_per_dim=test_bits_per_dim,
        seconds=seconds,
        data_stats=trainer.stats.to_dict(),
    )


@dataclass
class _Interval:
    """Training figures accumulated between two log lines."""

    sum_bits_per_dim: float = 0.0
    num_steps: int = 0
    seconds: float = 0.0
    lr: float = 0.0

    def add(self, bits_per_dim: float, seconds: float, lr: float) -> None:
        self.sum_bits_per_dim += bits_per_dim
        self.num_steps += 1
        self.seconds += seconds
        self.lr = lr


def _bpd_text(bits_per_dim: float, digits: int) -> str:
    """Formats bits/dim for the log line; "n/a" where no shards were given to measure it."""
    return f"{bits_per_dim:.{digits}f}" if math.isfinite(bits_per_dim) else "n/a"


def _report(trainer: _Trainer, interval: _Interval, elapsed: float) -> None:
    """Logs the fixed-format line and appends to metrics.jsonl (rank 0 writes)."""
    context = trainer.context
    totals = _sum_over_ranks([interval.sum_bits_per_dim, interval.num_steps], context)
    train_bits_per_dim = totals[0] / max(totals[1], 1)
    ms_per_step = 1000 * interval.seconds / max(interval.num_steps, 1)
    if not context.is_main:
        return
    logger.info(
        "step %d | train_bpd %.3f | val_bpd %s | lr %.1e | %.0f ms/step",
        trainer.step,
        train_bits_per_dim,
        _bpd_text(trainer.val_bits_per_dim, 3),
        interval.lr,
        ms_per_step,
    )
    record = {
        "step": trainer.step,
        "train_bits_per_dim": train_bits_per_dim,
        "val_bits_per_dim": _finite_or_none(trainer.val_bits_per_dim),
        "lr": interval.lr,
        "ms_per_step": ms_per_step,
        "elapsed_seconds": elapsed,
        "samples_seen": trainer.step * trainer.config.batch_size,
        "data_stats_rank0": trainer.stats.to_dict(),
    }
    with open(trainer.output_dir / METRICS_FILE, "a") as file:
        file.write(json.dumps(record) + "\n")


def _init_context(config: TrainConfig) -> _Context:
    """Joins the torchrun process group when there is one; picks device and precision."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = devices.resolve_device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)

    owns_process_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        owns_process_group = True
    return _Context(
        rank=rank,
        world_size=world_size,
        device=device,
        precision=_resolve_precision(config.precision, device),
        owns_process_group=owns_process_group,
    )


def _resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" is bf16 (or fp16 where bf16 is unsupported) on CUDA and "none" on the CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "none"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _rank_shards(pattern: str, context: _Context) -> list[str]:
    shards = shard_data.list_shards(pattern)
    return shard_data.assign_shards(shards, context.rank, context.world_size)


def _check_batch_size(config: TrainConfig, context: _Context) -> None:
    if config.batch_size % context.world_size:
        raise ValueError(
            f"batch_size {config.batch_size} (the global batch) must be divisible by the "
            f"{context.world_size} processes"
        )


def _check_resumable(config: TrainConfig, state: dict[str, Any], path: Path) -> None:
    """Raises unless the saved run's fixed fields equal this run's."""
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported training-state format {state.get('format_version')}")
    saved, current = state["config"], _json_safe(dataclasses.asdict(config))
    changed = [name for name in _RESUME_FIXED_FIELDS if saved.get(name) != current[name]]
    if changed:
        details = ", ".join(f"{name}: {saved.get(name)!r} -> {current[name]!r}" for name in changed)
        raise ValueError(f"{path}: cannot resume with changed settings ({details})")


def _wrap_ddp(model: torch.nn.Module, context: _Context) -> torch.nn.Module:
    if context.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _sum_over_ranks(values: list[float], context: _Context) -> list[float]:
    if context.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _gather_positions(position: dict[str, int], context: _Context) -> torch.Tensor:
    """Every rank's (epoch, position) as a (world_size, 2) int64 CPU tensor."""
    mine = torch.tensor([position["epoch"], position["position"]], dtype=torch.int64)
    if context.world_size == 1:
        return mine[None]
    mine = mine.to(context.device)
    gathered = [torch.zeros_like(mine) for _ in range(context.world_size)]
    dist.all_gather(gathered, mine)
    return torch.stack(gathered).cpu()


@contextlib.contextmanager
def _progress(trainer: _Trainer):
    """A tqdm bar on rank 0 when stderr is a terminal, with log lines printed around it."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    show = trainer.context.is_main and sys.stderr.isatty()
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(total=trainer.config.steps, initial=trainer.step, disable=not show, unit="step")
        )
        if show:
            stack.enter_context(logging_redirect_tqdm())
        yield bar


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metrics records past `step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """Tuples become lists, so a config compares equal after a JSON or torch.save round trip."""
    return {
        key: list(value) if isinstance(value, tuple) else value for key, value in values.items()
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _write_json(path: Path, values: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser of `train`; option names mirror `TrainConfig`."""
    defaults = TrainConfig(data="", output_dir="")
    parser = argparse.ArgumentParser(
        prog="pixeldensity train",
        description="Train a density model on WebDataset shards (alone or under torchrun).",
    )
    _add_data_arguments(parser.add_argument_group("data"), defaults)
    _add_model_arguments(parser.add_argument_group("model"), defaults)
    _add_optimisation_arguments(parser.add_argument_group("optimisation"), defaults)
    _add_run_arguments(parser.add_argument_group("run"), defaults)
    return parser


def _add_data_arguments(data, defaults: TrainConfig) -> None:
    data.add_argument("--data", required=True, help="training shards: braces, globs, URLs")
    data.add_argument("--val-data", help="validation shards")
    data.add_argument("--test-data", help="shards evaluated once at the end")
    data.add_argument("--channels", type=int, default=defaults.channels, choices=(1, 3))
    data.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=list(defaults.image_size),
        metavar="PIXELS",
        help="HEIGHT [WIDTH]; one number means square",
    )
    data.add_argument("--resize", default=defaults.resize, choices=RESIZE_MODES)
    data.add_argument("--shuffle-buffer", type=int, default=defaults.shuffle_buffer)
    data.add_argument("--max-initial-failures", type=int, default=defaults.max_initial_failures)


def _add_model_arguments(model, defaults: TrainConfig) -> None:
    model.add_argument("--model", default=defaults.model, choices=pixeldensity.list_models())
    model.add_argument("--hidden-channels", type=int, help="override the preset's width")
    model.add_argument("--num-layers", type=int, help="override the preset's depth")
    model.add_argument("--head-channels", type=int, help="override the preset's head width")


def _add_optimisation_arguments(optim, defaults: TrainConfig) -> None:
    optim.add_argument("--steps", type=int, default=defaults.steps)
    optim.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global")
    optim.add_argument("--optimizer", default=defaults.optimizer, choices=training.OPTIMIZERS)
    optim.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    optim.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    optim.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    optim.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio)
    optim.add_argument(
        "--clip-norm", type=float, default=defaults.clip_norm, help="0 turns clipping off"
    )
    optim.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    optim.add_argument(
        "--perturb-rate",
        type=float,
        default=defaults.perturb_rate,
        help="fraction of input pixels replaced by uniform noise (background model)",
    )
    optim.add_argument("--seed", type=int, default=defaults.seed)


def _add_run_arguments(run_group, defaults: TrainConfig) -> None:
    run_group.add_argument("--output-dir", required=True)
    run_group.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    run_group.add_argument("--eval-every", type=int, default=defaults.eval_every)
    run_group.add_argument("--max-val-samples", type=int, help="per interval (final: all)")
    run_group.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
    run_group.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    run_group.add_argument("--device", default=defaults.device)
    run_group.add_argument("--precision", default=defaults.precision, choices=PRECISIONS)
    run_group.add_argument("--threads", type=int, help="torch CPU threads per process")
    run_group.add_argument("--name", help="model id prefix (default: the output folder name)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Builds the `TrainConfig` of parsed command-line arguments."""
    if len(args.image_size) not in (1, 2):
        raise ValueError(f"--image-size takes HEIGHT [WIDTH], got {args.image_size}")
    height, width = args.image_size[0], args.image_size[-1]
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in vars(args).items() if name in fields}
    values["image_size"] = (height, width)
    values["clip_norm"] = args.clip_norm or None
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> TrainResult:
    """Command-line entry point: `python -m pipelines.train --data ... --output-dir ...`."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    command_args = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "pipelines.train", *command_args])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        command = f"torchrun --nproc_per_node={world_size} -m pipelines.train " + shlex.join(
            command_args
        )
    return run(config_from_args(args), resume=args.resume, command=command)


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main)())
