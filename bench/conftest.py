"""Fixtures of the pytest-benchmark suites: tiny shapes, so that CI runs them in seconds."""

from __future__ import annotations

import pytest
import torch

from bench.providers import FfnInputs, Shape, make_inputs
from bench.suites import Suite

# Odd sizes on purpose (no powers of two); E=4, k=2 over 37 tokens leaves every expert some tokens.
TINY = Shape(T=37, H=48, I=80, E=4, k=2, r=6)


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: the suite is small and CI machines are shared; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_inputs() -> FfnInputs:
    return make_inputs(TINY, seed=0)


def tiny_shape(suite: Suite, **dims):
    """The last (largest) row of `suite`'s tiny preset, with `dims` changed."""
    preset = suite.presets["tiny"]
    return suite.shape(preset.cases[-1], {**preset.dims, **dims})


def skip_if_missing(suite: Suite, provider: str) -> None:
    if (why := suite.missing(provider, torch.device("cpu"))) is not None:
        pytest.skip(why)
