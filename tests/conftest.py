"""Shared fixtures: small real images and tiny trained-free models."""

from __future__ import annotations

import logging

import pytest
import torch

import pixeldensity

logging.getLogger("apache_beam").setLevel(logging.WARNING)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same random state, with two threads at most."""
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture(params=pixeldensity.list_models())
def model_name(request) -> str:
    """Parametrizes a test over every registered model preset."""
    return request.param


# --- Shards of real images for the make_shards and training tests. ---
FASHION_FIRST64_IMAGES = "data/fashion_mnist_t10k_first64-images-idx3-ubyte.gz"
FASHION_FIRST64_LABELS = "data/fashion_mnist_t10k_first64-labels-idx1-ubyte.gz"


@pytest.fixture
def fashion_idx_paths():
    """(images, labels) paths of the first 64 Fashion-MNIST test images, IDX gzipped."""
    from pathlib import Path

    here = Path(__file__).parent
    return here / FASHION_FIRST64_IMAGES, here / FASHION_FIRST64_LABELS


@pytest.fixture
def fashion_shards(tmp_path, fashion_idx_paths):
    """The 64 images written as 4 shards of 16 (`tmp_path/shards/fashion-00000N.tar`)."""
    from pipelines import make_shards

    source = make_shards.open_source(str(fashion_idx_paths[0]), labels=str(fashion_idx_paths[1]))
    summary = make_shards.run(source, str(tmp_path / "shards" / "fashion"), samples_per_shard=16)
    return summary.shards
