"""Tests of pipelines.shard_data and pipelines.train on tiny shards of real images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import pixeldensity
from pipelines import cli, shard_data, train
from pipelines.sources import read_idx

REPOSITORY = Path(__file__).resolve().parents[1]


def stream(shards, **options) -> shard_data.ShardStream:
    defaults = dict(batch_size=8, channels=1, size=(28, 28), seed=0, shuffle_buffer=10)
    return shard_data.ShardStream(shards, **{**defaults, **options})


def tiny_config(tmp_path, shards, **overrides) -> train.TrainConfig:
    shard_folder = Path(shards[0]).parent
    values = dict(
        data=str(shard_folder / "fashion-{000000..000003}.tar"),
        val_data=str(shard_folder / "fashion-00000[01].tar"),
        output_dir=str(tmp_path / "run"),
        model="pixelcnn_tiny",
        steps=6,
        batch_size=8,
        warmup_steps=2,
        eval_every=3,
        checkpoint_every=3,
        shuffle_buffer=16,
        eval_batch_size=16,
        threads=1,
    )
    return train.TrainConfig(**{**values, **overrides})


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """Writes (key, {extension: bytes}) samples as a tar shard; returns its path."""
    import io

    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return str(path)


def test_list_shards_expands_braces_and_globs(fashion_shards):
    folder = Path(fashion_shards[0]).parent
    assert shard_data.list_shards(str(folder / "fashion-{000000..000003}.tar")) == fashion_shards
    assert shard_data.list_shards(str(folder / "fashion-*.tar")) == fashion_shards
    assert shard_data.list_shards(f"file://{folder}/fashion-00000[12].tar") == fashion_shards[1:3]
    with pytest.raises(ValueError, match="matched no files"):
        shard_data.list_shards(str(folder / "nothing-*.tar"))


def test_list_and_read_shards_through_an_fsspec_url(fashion_shards):
    fsspec = pytest.importorskip("fsspec")
    filesystem = fsspec.filesystem("memory")
    for shard in fashion_shards[:2]:
        filesystem.pipe(f"/pd-test/{Path(shard).name}", Path(shard).read_bytes())

    shards = shard_data.list_shards("memory://pd-test/fashion-{000000..000001}.tar")
    globbed = shard_data.list_shards("memory://pd-test/fashion-*.tar")
    samples = [sample for shard in shards for sample in shard_data.iter_shard(shard)]

    assert shards == globbed and len(shards) == 2 and shards[0].startswith("memory://")
    assert [sample.key for sample in samples] == [f"{index:06d}" for index in range(32)]
    filesystem.rm("/pd-test", recursive=True)


def test_assign_shards_gives_ranks_disjoint_sets_covering_all():
    shards = [f"s{index}" for index in range(7)]
    assigned = [shard_data.assign_shards(shards, rank, 3) for rank in range(3)]
    assert assigned == [["s0", "s3", "s6"], ["s1", "s4"], ["s2", "s5"]]
    assert sorted(sum(assigned, [])) == shards


def test_assign_shards_fails_when_a_rank_would_get_no_shard():
    with pytest.raises(ValueError, match="2 shard.* cannot give each of 3 processes"):
        shard_data.assign_shards(["a", "b"], 0, 3)


def test_shard_stream_pixels_match_the_source(fashion_shards, fashion_idx_paths):
    images = torch.from_numpy(read_idx(fashion_idx_paths[0]))
    batch = stream(fashion_shards, shuffle_buffer=1, batch_size=64).next_batch()
    assert batch.shape == (64, 1, 28, 28) and batch.dtype == torch.uint8
    # One epoch holds every image exactly once, in a shuffled shard order.
    rows = {tuple(image.flatten().tolist()) for image in batch}
    assert rows == {tuple(image.flatten().tolist()) for image in images}


def test_shard_stream_order_is_seeded_per_epoch_and_rank(fashion_shards):
    def first_batch(**options):
        return stream(fashion_shards, **options).next_batch()

    torch.testing.assert_close(first_batch(seed=1), first_batch(seed=1))
    assert not torch.equal(first_batch(seed=1), first_batch(seed=2))
    assert not torch.equal(first_batch(rank=0), first_batch(rank=1))
    assert not torch.equal(first_batch(), first_batch(epoch=1))


def test_shard_stream_resumes_at_its_saved_position(fashion_shards):
    original = stream(fashion_shards)
    for _ in range(11):  # crosses an epoch boundary (64 images, 8 per batch)
        original.next_batch()
    state = original.state()
    expected = [original.next_batch() for _ in range(3)]

    resumed = stream(fashion_shards, **state)
    assert state["epoch"] == 1
    for batch in expected:
        torch.testing.assert_close(resumed.next_batch(), batch)


def test_corrupt_member_is_skipped_counted_and_logged(tmp_path, fashion_shards, caplog):
    with tarfile.open(fashion_shards[0]) as archive:
        good = [
            (member.name.split(".")[0], {"png": archive.extractfile(member).read()})
            for member in archive.getmembers()
            if member.name.endswith(".png")
        ]
    bad_shard = write_shard(
        tmp_path / "bad.tar",
        [good[0], ("broken", {"png": b"\x89PNG\r\n\x1a\nnot a png"}), ("nojpg", {"txt": b"x"})]
        + good[1:],
    )

    data = stream([bad_shard], batch_size=16, shuffle_buffer=1)
    batch = data.next_batch()

    assert batch.shape[0] == 16
    assert data.stats.num_bad_samples == 2
    assert data.stats.bad_reasons == {"unidentified_image": 1, "missing_image": 1}
    assert "skipping sample broken in shard" in caplog.text
    assert "bad.tar" in caplog.text


def test_unreadable_shard_is_reported_and_skipped(tmp_path, fashion_shards, caplog):
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(Path(fashion_shards[1]).read_bytes()[:10_000])
    missing = str(tmp_path / "missing.tar")

    shards = [fashion_shards[0], str(truncated), missing]

    stats = shard_data.DataStats()
    batches = shard_data.iter_eval_batches(
        shards, batch_size=64, channels=1, size=(28, 28), stats=stats
    )
    num_read = sum(batch.shape[0] for batch in batches)
    assert 16 < num_read < 32  # shard 0 and the samples before the truncation
    assert stats.num_unreadable_shards == 2
    assert "unreadable shard" in caplog.text
    assert "No such file or directory" in caplog.text and "missing.tar" in caplog.text

    # The endless training stream keeps going over the readable samples.
    data = stream(shards, batch_size=16, shuffle_buffer=1)
    assert all(data.next_batch().shape[0] == 16 for _ in range(4))


def test_stream_of_only_bad_samples_raises_instead_of_training_on_nothing(tmp_path):
    bad = write_shard(tmp_path / "bad.tar", [(f"k{i}", {"png": b"junk"}) for i in range(5)])
    with pytest.raises(RuntimeError, match="refusing to train on nothing"):
        stream([bad], max_initial_failures=3).next_batch()
    with pytest.raises(RuntimeError, match="gave no usable sample"):
        stream([bad], max_initial_failures=100).next_batch()


def test_iter_eval_batches_reads_everything_once_in_order(fashion_shards, fashion_idx_paths):
    images = torch.from_numpy(read_idx(fashion_idx_paths[0]))[:, None]
    batches = list(
        shard_data.iter_eval_batches(fashion_shards, batch_size=24, channels=1, size=(28, 28))
    )
    assert [batch.shape[0] for batch in batches] == [24, 24, 16]
    torch.testing.assert_close(torch.cat(batches), images)
    limited = shard_data.iter_eval_batches(
        fashion_shards, batch_size=24, channels=1, size=(28, 28), max_samples=30
    )
    assert sum(batch.shape[0] for batch in limited) == 30


@pytest.mark.slow
def test_train_run_writes_checkpoint_metrics_and_config(tmp_path, fashion_shards):
    config = tiny_config(tmp_path, fashion_shards, test_data=fashion_shards[3])
    result = train.run(config, command="pytest")

    assert result.steps == 6 and np.isfinite(result.val_bits_per_dim)
    checkpoint = pixeldensity.load_checkpoint(result.checkpoint)
    assert checkpoint.image_shape == (1, 28, 28)
    assert checkpoint.training["steps"] == 6
    assert checkpoint.training["val_bits_per_dim"] == pytest.approx(result.val_bits_per_dim)
    assert checkpoint.training["test_bits_per_dim"] == pytest.approx(result.test_bits_per_dim)
    assert checkpoint.training["command"] == "pytest"
    assert checkpoint.training["data"] == config.data

    run_dir = Path(config.output_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == [3, 6]
    resolved = json.loads((run_dir / "checkpoint" / "train_config.json").read_text())
    assert resolved["world_size"] == 1 and resolved["model"] == "pixelcnn_tiny"


class _Crash(Exception):
    """Stands in for a SIGKILL right after a checkpoint."""


@pytest.mark.slow
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, fashion_shards, monkeypatch):
    uninterrupted = train.run(tiny_config(tmp_path / "a", fashion_shards, perturb_rate=0.1))

    save = train._Trainer.save

    def save_then_crash(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.step == 3:
            raise _Crash

    config = tiny_config(tmp_path / "b", fashion_shards, perturb_rate=0.1)
    monkeypatch.setattr(train._Trainer, "save", save_then_crash)
    with pytest.raises(_Crash):
        train.run(config)
    monkeypatch.setattr(train._Trainer, "save", save)
    resumed = train.run(config, resume=True)

    assert resumed.val_bits_per_dim == pytest.approx(uninterrupted.val_bits_per_dim, abs=1e-6)
    first = pixeldensity.load_checkpoint(uninterrupted.checkpoint).model.state_dict()
    second = pixeldensity.load_checkpoint(resumed.checkpoint).model.state_dict()
    for key, value in first.items():
        torch.testing.assert_close(second[key], value)
    steps = [json.loads(line)["step"] for line in open(Path(config.output_dir) / "metrics.jsonl")]
    assert steps == [3, 6]


def test_resume_with_changed_settings_is_refused(tmp_path, fashion_shards):
    config = tiny_config(tmp_path, fashion_shards, steps=3)
    train.run(config)
    changed = tiny_config(tmp_path, fashion_shards, steps=3, lr=1e-2)
    with pytest.raises(ValueError, match=r"cannot resume with changed settings \(lr"):
        train.run(changed, resume=True)


def test_cli_train_subcommand_runs(tmp_path, fashion_shards):
    folder = Path(fashion_shards[0]).parent
    output = tmp_path / "cli_run"
    args = ["train", "--data", str(folder / "fashion-*.tar"), "--output-dir", str(output)]
    args += ["--model", "pixelcnn_tiny", "--steps", "2", "--batch-size", "4", "--threads", "1"]
    assert cli.main(args) == 0
    config = json.loads((output / "checkpoint" / "config.json").read_text())
    assert config["training"]["command"].startswith("python -m pipelines.train --data")


def torchrun(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs `torchrun --standalone --nproc_per_node=2 -m pipelines.train ARGS`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", "-m", "pipelines.train", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    return subprocess.run(
        command,
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.ddp
@pytest.mark.slow
def test_two_process_gloo_run_trains_and_checkpoints(tmp_path, fashion_shards):
    folder = Path(fashion_shards[0]).parent
    output = tmp_path / "ddp"
    result = torchrun(
        [
            "--data",
            str(folder / "fashion-*.tar"),
            "--val-data",
            str(folder / "fashion-00000[012].tar"),
            "--output-dir",
            str(output),
            "--model",
            "pixelcnn_tiny",
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--eval-every",
            "2",
            "--shuffle-buffer",
            "8",
            "--threads",
            "1",
        ]
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 4 | train_bpd" in result.stderr
    checkpoint = pixeldensity.load_checkpoint(output / "checkpoint")
    assert checkpoint.training["world_size"] == 2
    assert checkpoint.training["command"].startswith("torchrun --nproc_per_node=2")
    state = torch.load(output / "checkpoint" / "training_state.pt", weights_only=True)
    assert state["data_positions"].shape == (2, 2)
    assert (state["data_positions"][:, 1] >= 4 * 4).all()  # 4 steps of 4 images per rank


@pytest.mark.ddp
def test_two_processes_on_one_shard_fail_fast_with_a_clear_message(tmp_path, fashion_shards):
    args = ["--data", fashion_shards[0], "--output-dir", str(tmp_path / "x")]
    result = torchrun(args + ["--model", "pixelcnn_tiny", "--steps", "2"])
    assert result.returncode != 0
    assert "1 shard(s) cannot give each of 2 processes its own shard" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_run_on_cuda_uses_autocast_without_options(tmp_path, fashion_shards):
    result = train.run(tiny_config(tmp_path, fashion_shards, steps=3, eval_every=3))
    resolved = json.loads((result.checkpoint / "train_config.json").read_text())
    assert resolved["device"].startswith("cuda") and resolved["precision"] in ("bf16", "fp16")
    assert np.isfinite(result.val_bits_per_dim)
