"""Masks kept a bit per weight: exact round trips, shapes and the refusal of non-boolean masks."""
from __future__ import annotations

import copy

import pytest
import torch

from graphprune.errors import GraphPruneError
from graphprune.graph.model import PackedMasks


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (64, 9), (2, 3, 11)])
def test_a_mask_reads_back_exactly_at_an_eighth_of_the_bytes(shape) -> None:
    torch.manual_seed(0)
    masks = PackedMasks()
    cases = {"random": torch.rand(shape) > 0.5, "all": torch.ones(shape, dtype=torch.bool), "none": torch.zeros(shape, dtype=torch.bool)}
    for name, mask in cases.items():
        masks[name] = mask
    for name, mask in cases.items():
        back = masks[name]
        assert back.dtype == torch.bool and back.shape == mask.shape
        assert torch.equal(back, mask)
    numel = torch.Size(shape).numel()
    assert masks.nbytes == 3 * ((numel + 7) // 8)
    assert set(masks) == set(cases) and len(masks) == 3


def test_reads_are_copies_and_deep_copies_are_independent() -> None:
    masks = PackedMasks({"a": torch.tensor([[True, False], [False, True]])})
    read = masks["a"]
    read.fill_(False)  # editing a read does not edit the store
    assert torch.equal(masks["a"], torch.tensor([[True, False], [False, True]]))
    clone = copy.deepcopy(masks)
    masks["a"] = masks["a"][:, :1]  # slicing as SlicePass does
    assert masks["a"].shape == (2, 1) and clone["a"].shape == (2, 2)
    del masks["a"]
    assert "a" not in masks and "a" in clone


def test_a_non_boolean_mask_is_refused() -> None:
    with pytest.raises(GraphPruneError, match="boolean keep-masks"):
        PackedMasks()["w"] = torch.ones(3)
