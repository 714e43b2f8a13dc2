"""Shared fixtures: tiny models (function scope: passes mutate them) and the default model (slow)."""
from __future__ import annotations

import pytest
import torch

from graphprune.models.tiny import random_tokens, tiny_llama, tiny_opt

torch.set_num_threads(2)

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
