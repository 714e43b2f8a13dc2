"""Shared fixtures: tiny models (function scope: passes mutate them) and the default model (slow)."""
from __future__ import annotations

import os

import pytest
import torch

from graphprune.models.tiny import random_tokens, tiny_llama, tiny_opt

# One torch thread per core; under pytest-xdist (scripts/test.sh) the cores are shared out
# among the workers, so that together they never run more threads than there are cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

TINY = {"tiny-llama": tiny_llama, "tiny-opt": tiny_opt}


@pytest.fixture(params=sorted(TINY))
def tiny_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_model(tiny_name: str) -> torch.nn.Module:
    return TINY[tiny_name]()


@pytest.fixture
def tokens() -> torch.Tensor:
    return random_tokens(2, 24, seed=7)


_CAPTURED: dict[str, object] = {}


@pytest.fixture
def tiny_gm(tiny_name: str):
    """A captured tiny model (captured once per session, cloned for each test)."""
    from graphprune.graph.model import GraphModel

    if tiny_name not in _CAPTURED:
        _CAPTURED[tiny_name] = GraphModel.capture(TINY[tiny_name](), name=tiny_name)
    return _CAPTURED[tiny_name].clone()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def default_model():
    from graphprune.models import load_model

    return load_model("smollm2-135m")
