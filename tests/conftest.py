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
