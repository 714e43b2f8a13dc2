"""Protocol text, splits, calibration sampling and perplexity."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from graphprune.data import TokenSplits, default_text, read_texts
from graphprune.errors import DataError
from graphprune.eval import perplexity
from graphprune.models import ByteTokenizer


def test_default_text_and_splits() -> None:
    text = default_text()
    assert text.startswith(sorted(__import__("pydoc_data.topics").topics.topics.items())[0][1][:50])
    s = TokenSplits.from_text(ByteTokenizer(), text)
    n = len(text.encode())
    assert s.calib.numel() == int(0.8 * n) and s.calib.numel() + s.eval.numel() == n


def test_calibration_offsets_follow_protocol() -> None:
    s = TokenSplits.from_text(ByteTokenizer(), default_text())
    calib = s.calibration(5, 32, seed=0)
    starts = torch.randint(0, s.calib.numel() - 32, (5,), generator=torch.Generator().manual_seed(0))
    for row, st in zip(calib, starts.tolist()):
        assert torch.equal(row, s.calib[st : st + 32])
    assert not torch.equal(calib, s.calibration(5, 32, seed=1))


def test_eval_windows_drop_remainder() -> None:
    s = TokenSplits(calib=torch.arange(10), eval=torch.arange(103))
    w = s.eval_windows(10)
    assert w.shape == (10, 10) and torch.equal(w.flatten(), torch.arange(100))


def test_data_errors(tmp_path) -> None:
    s = TokenSplits(calib=torch.arange(10), eval=torch.arange(5))
    with pytest.raises(DataError, match="fewer than one segment"):
        s.calibration(2, 16)
    with pytest.raises(DataError, match="fewer than one window"):
        s.eval_windows(16)
    with pytest.raises(DataError, match="does not exist"):
        read_texts([tmp_path / "missing.txt"])
    (tmp_path / "a.txt").write_text("hello")
    assert read_texts([tmp_path / "a.txt", tmp_path / "a.txt"]) == "hello\n\nhello"


def test_perplexity_matches_manual_nll(tiny_model) -> None:
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))

    def logits(ids):
        return tiny_model(input_ids=ids, use_cache=False).logits

    res = perplexity(logits, windows, batch_size=2)
    with torch.no_grad():
        lg = logits(windows)
    nll = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), windows[:, 1:].reshape(-1))
    assert res["tokens"] == 5 * 11
    assert res["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    # a logits budget of one window's worth scores window by window: the same figure
    one = perplexity(logits, windows, batch_size=4, max_logits_mib=12 * lg.shape[-1] * 4 / 2**20)
    assert one["tokens"] == res["tokens"] and one["ppl"] == pytest.approx(res["ppl"], rel=1e-6)


def test_long_windows_are_scored_in_position_chunks() -> None:
    """Windows longer than one cross-entropy chunk give the closed-form NLL of a fixed distribution."""
    vocab, length = 7, 600
    probs = torch.softmax(torch.arange(vocab, dtype=torch.float32), 0)
    ids = torch.randint(0, vocab, (3, length), generator=torch.Generator().manual_seed(1))
    res = perplexity(lambda x: probs.log().expand(*x.shape, vocab), ids, batch_size=2)
    expected = -probs.double().log()[ids[:, 1:]].mean()
    assert res["tokens"] == 3 * (length - 1)
    assert res["nll"] == pytest.approx(float(expected), rel=1e-6)


def test_uniform_model_has_vocab_perplexity() -> None:
    res = perplexity(lambda ids: torch.zeros(*ids.shape, 50), torch.randint(0, 50, (3, 9)))
    assert res["ppl"] == pytest.approx(50.0, rel=1e-6)
