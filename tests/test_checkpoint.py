"""Checkpoints: round trip, and a clear refusal of every kind of broken file."""

from __future__ import annotations

import json

import pytest
import torch

import pixeldensity
from pixeldensity.checkpoint import CheckpointError, update_calibration


@pytest.fixture
def saved(tmp_path):
    model = pixeldensity.create_model("row_lstm_tiny", in_channels=3).eval()
    directory = pixeldensity.save_checkpoint(
        tmp_path / "ckpt", model, image_shape=(3, 6, 5), name="test", training={"steps": 3}
    )
    return model, directory


def test_checkpoint_round_trip_gives_identical_scores(saved):
    model, directory = saved
    images = torch.randint(0, 256, (4, 3, 6, 5), dtype=torch.uint8)

    loaded = pixeldensity.load_checkpoint(directory)

    with torch.no_grad():
        assert torch.equal(model.bits_per_dim(images), loaded.model.bits_per_dim(images))
    assert loaded.image_shape == (3, 6, 5)
    assert loaded.training == {"steps": 3}
    assert loaded.calibration is None
    assert loaded.model_id.startswith("test-")
    assert not loaded.model.training


def test_checkpoint_loads_from_either_file_path(saved):
    _, directory = saved

    by_config = pixeldensity.load_checkpoint(directory / "config.json")
    by_weights = pixeldensity.load_checkpoint(directory / "model.safetensors")

    assert by_config.model_id == by_weights.model_id


def test_truncated_weights_are_refused_naming_the_file(saved):
    _, directory = saved
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    with pytest.raises(CheckpointError, match=r"model\.safetensors.*SHA-256"):
        pixeldensity.load_checkpoint(directory)


def test_edited_weights_are_refused(saved):
    _, directory = saved
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match="edited, truncated"):
        pixeldensity.load_checkpoint(directory)


def test_corrupt_weights_with_a_matching_digest_are_refused_as_unreadable(saved):
    _, directory = saved
    weights = directory / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    config = json.loads((directory / "config.json").read_text())
    import hashlib

    config["weights_sha256"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    (directory / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        pixeldensity.load_checkpoint(directory)


def test_config_that_does_not_fit_the_weights_is_refused(saved):
    _, directory = saved
    config = json.loads((directory / "config.json").read_text())
    config["model_config"]["hidden_channels"] = 32
    (directory / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError, match="has shape"):
        pixeldensity.load_checkpoint(directory)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text[:40], "not valid JSON"),
        (
            lambda text: text.replace('"format_version": 1', '"format_version": 9'),
            "format_version 9",
        ),
        (
            lambda text: text.replace('"architecture": "row_lstm"', '"architecture": "x"'),
            "invalid model config",
        ),
    ],
)
def test_broken_config_is_refused_with_a_clear_message(saved, edit, message):
    _, directory = saved
    path = directory / "config.json"
    path.write_text(edit(path.read_text()))

    with pytest.raises(CheckpointError, match=message):
        pixeldensity.load_checkpoint(directory)


def test_missing_checkpoint_names_the_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: checkpoint config is missing"):
        pixeldensity.load_checkpoint(tmp_path)


def test_update_calibration_keeps_the_weights_loadable(saved):
    _, directory = saved

    update_calibration(directory, {"score_name": "complexity_score", "n": 3})

    assert pixeldensity.load_checkpoint(directory).calibration["n"] == 3


def test_missing_checkpoint_directory_is_named_as_such(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory does not exist"):
        pixeldensity.load_checkpoint(tmp_path / "no_such_checkpoint")
