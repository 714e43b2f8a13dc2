"""Built-in texts (the protocol text and the second evaluation domain), calibration drawn
from several texts in set proportions, and evaluation on each text."""
from __future__ import annotations

import pytest
import torch

from graphprune.data import PROTOCOL_EVAL_TEXTS, NamedText, TextSplits, TokenSplits, calibration_shares, default_text, load_texts, news_text
from graphprune.errors import ConfigError, DataError
from graphprune.eval import perplexity
from graphprune.models import ByteTokenizer
from graphprune.pipeline import PruneJob
from graphprune.pipeline.prune import PrunePlan, eval_text_specs, evaluate_texts


def test_news_text_is_english_prose_distinct_from_the_protocol_text() -> None:
    news = news_text()
    articles = news.split("\n\n")
    assert len(articles) == 300  # the Lee background corpus: 300 articles, one per line in the file
    assert all(a and "\n" not in a for a in articles)
    words = news.split()
    assert len(words) > 50_000
    # prose, not code or documentation: sentences end in full stops, no reST/code markers
    assert news.count(". ") > 2_000 and "::" not in news and "def " not in news
    pydoc = default_text()
    assert set(news.split()[:200]).isdisjoint({"__init__", "lambda", "yield"})
    assert not (set(articles) & set(pydoc.split("\n\n")))
    assert [t.name for t in load_texts(list(PROTOCOL_EVAL_TEXTS))] == ["pydoc", "news"]


def test_load_texts_resolves_files_then_builtin_names(tmp_path) -> None:
    assert load_texts([]) == [NamedText("pydoc", default_text())]
    news_file = tmp_path / "news"
    news_file.write_text("my own text")
    # an existing file wins over the built-in name it shadows
    assert load_texts([str(news_file)]) == [NamedText(str(news_file), "my own text")]
    with pytest.raises(DataError, match="neither an existing file nor a built-in text"):
        load_texts(["no-such-text"])
    with pytest.raises(DataError, match="text file .*missing.txt does not exist"):
        load_texts([str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match="same text twice"):
        load_texts(["pydoc", "pydoc"])


def test_calibration_shares_are_proportional_and_sum_to_samples() -> None:
    assert calibration_shares(64, [1, 1]) == [32, 32]
    assert calibration_shares(64, [3, 1]) == [48, 16]
    assert calibration_shares(7, [1, 1, 1]) == [3, 2, 2]  # largest remainder, ties to the earlier text
    assert calibration_shares(10, [1, 0]) == [10, 0]
    for weights in ([0.2, 0.3, 0.5], [1, 2, 3, 4], [5, 1e-3]):
        shares = calibration_shares(37, weights)
        assert sum(shares) == 37
        assert all(abs(s - 37 * w / sum(weights)) < 1 for s, w in zip(shares, weights))
    with pytest.raises(DataError, match="non-negative"):
        calibration_shares(8, [1, -1])
    with pytest.raises(DataError, match="positive sum"):
        calibration_shares(8, [0, 0])


def _contains(pool: torch.Tensor, row: torch.Tensor) -> bool:
    windows = pool.unfold(0, row.numel(), 1)
    return bool((windows == row).all(1).any())


def test_one_text_calibrates_exactly_as_the_protocol() -> None:
    tok = ByteTokenizer()
    single = TextSplits.from_texts(tok, load_texts([]))
    ref = TokenSplits.from_text(tok, default_text())
    assert torch.equal(single.calibration(6, 48, seed=3), ref.calibration(6, 48, seed=3))
    assert torch.equal(single.eval_windows(256)["pydoc"], ref.eval_windows(256))


def test_several_texts_give_their_shares_from_their_own_pools() -> None:
    tok = ByteTokenizer()
    a = "".join(chr(97 + i % 13) for i in range(3000))  # lowercase a..m
    b = "".join(chr(65 + i % 7) for i in range(5000))  # uppercase A..G
    splits = TextSplits.from_texts(tok, [NamedText("a", a), NamedText("b", b)])
    calib = splits.calibration(10, 32, seed=0, weights=[3, 2])
    assert calib.shape == (10, 32) and splits.shares(10, [3, 2]) == {"a": 6, "b": 4}
    pool_a, pool_b = splits.parts[0][1].calib, splits.parts[1][1].calib
    assert all(_contains(pool_a, row) for row in calib[:6]) and all(_contains(pool_b, row) for row in calib[6:])
    # text i's segments are the protocol's draw with seed + i
    assert torch.equal(calib[6:], splits.parts[1][1].calibration(4, 32, seed=1))
    # equal shares by default; a zero weight leaves a text out of calibration
    assert splits.calibration(10, 32).shape == (10, 32) and splits.shares(10) == {"a": 5, "b": 5}
    assert all(_contains(pool_b, row) for row in splits.calibration(4, 32, weights=[0, 1]))
    # the evaluation split of every text stays out of every calibration pool
    ev = splits.eval_windows(64)
    assert ev["a"].numel() == (len(a) - int(0.8 * len(a))) // 64 * 64
    with pytest.raises(DataError, match="2 texts"):
        splits.calibration(4, 32, weights=[1])
    with pytest.raises(DataError, match="text 'a'"):
        splits.calibration(4, 2900)


def test_evaluate_texts_scores_each_text_separately(tiny_model, tmp_path) -> None:
    tok = ByteTokenizer()
    (tmp_path / "one.txt").write_text(default_text()[:4000])
    (tmp_path / "two.txt").write_text(news_text()[:6000])
    specs = [str(tmp_path / "one.txt"), str(tmp_path / "two.txt")]

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return tiny_model(input_ids=ids, use_cache=False).logits

    res = evaluate_texts(logits, tok, specs, 128, batch_size=2)
    assert list(res["texts"]) == specs
    for spec in specs:
        windows = TokenSplits.from_text(tok, open(spec).read()).eval_windows(128)
        direct = perplexity(logits, windows, batch_size=2)
        assert res["texts"][spec]["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
        assert res["texts"][spec]["tokens"] == direct["tokens"]
    assert res["ppl"] == res["texts"][specs[0]]["ppl"]  # the headline figure is the first text's
    assert res["texts"][specs[0]]["ppl"] != pytest.approx(res["texts"][specs[1]]["ppl"], rel=1e-3)


def test_which_texts_a_run_evaluates_on() -> None:
    assert eval_text_specs(()) == ["pydoc", "news"]
    assert eval_text_specs(("a.txt",)) == ["a.txt"]
    assert eval_text_specs(("a.txt",), ("news",)) == ["news"]


def test_text_settings_are_checked_before_loading(tmp_path) -> None:
    with pytest.raises(ConfigError, match="one weight per --text entry"):
        PrunePlan.of(PruneJob(model="tiny-llama", method="wanda", sparsity=0.5, text=("pydoc", "news"), text_weights=(1.0,)))
    with pytest.raises(DataError, match="non-negative"):
        PrunePlan.of(PruneJob(model="tiny-llama", method="wanda", sparsity=0.5, text=("pydoc", "news"), text_weights=(1.0, -2.0)))
    with pytest.raises(ConfigError, match="text file missing.txt does not exist"):
        PrunePlan.of(PruneJob(model="tiny-llama", method="wanda", sparsity=0.5, evaluate=True, eval_text=("missing.txt",)))
    with pytest.raises(ConfigError, match="neither an existing file nor a built-in text"):
        PrunePlan.of(PruneJob(model="tiny-llama", method="wanda", sparsity=0.5, text=("newz",)))
