"""The synthetic recall suite: generators, the in-process trainer, the CLI and its Ray Tune grid."""

from __future__ import annotations

import json

import pytest
import torch

from cli.main import main as cli_main
from leviathan.data.synthetic import LETTERS, QUERY_MARK, TASKS, TaskSettings, key_len, make_batch
from leviathan.synthetic_train import SyntheticRun, train_synthetic

SETTINGS = TaskSettings()


def batch(task: str, seed: int = 0, rows: int = 16, settings: TaskSettings = SETTINGS):
    return make_batch(task, rows, settings, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("task", TASKS)
def test_the_same_seed_gives_the_same_tensors_and_another_seed_others(task):
    a, b, c = batch(task, 3), batch(task, 3), batch(task, 4)
    for x, y in ((a.inputs, b.inputs), (a.targets, b.targets), (a.mask, b.mask)):
        assert torch.equal(x, y), f"{task}: seed 3 drew two different batches"
    assert not torch.equal(a.inputs, c.inputs), f"{task}: seeds 3 and 4 drew the same inputs"
    assert a.mask.any(dim=1).all(), f"{task}: a row without an answer position"
    assert a.inputs.shape[1] == SETTINGS.seq_len_of(task)


def pairs_of(row: torch.Tensor, k: int, n: int) -> dict[tuple[int, ...], int]:
    """The key -> value pairs at the start of a recall row."""
    chunks = row[: n * (k + 1)].view(n, k + 1).tolist()
    return {tuple(c[:k]): c[k] for c in chunks}


@pytest.mark.parametrize("task", ["mqar", "mtk1", "mtk2", "mtk3", "mtk4"])
def test_a_recall_answer_is_the_value_that_followed_the_queried_key(task):
    k, n = key_len(task), SETTINGS.pairs
    b = batch(task)
    for row, targets, mask in zip(b.inputs, b.targets, b.mask):
        pairs = pairs_of(row, k, n)
        assert len(pairs) == n, f"{task}: two pairs share a key"
        at = mask.nonzero().flatten().tolist()
        assert len(at) == n, f"{task}: {len(at)} answers for {n} pairs"
        for t in at:
            # mtk asks at the marker after the key (`key ? v`), mqar at the key's last token
            end = t if task == "mqar" else t - 1
            if task != "mqar":
                assert row[t] == QUERY_MARK, f"{task}: the answer at {t} is not asked at the query marker"
            key = tuple(row[end - k + 1 : end + 1].tolist())
            assert pairs[key] == targets[t], f"{task}: at {t} the key {key} was followed by {pairs[key]}, target {targets[t]}"
            assert row[t + 1] == targets[t], f"{task}: the query's value is not teacher-forced after it"
        if task != "mqar":
            assert QUERY_MARK not in row[: n * (k + 1)].tolist(), f"{task}: the marker appears among the pairs"


@pytest.mark.parametrize("task", ["mtk2", "mtk3", "mtk4"])
def test_only_the_whole_k_gram_identifies_a_multi_token_key(task):
    """Every proper suffix of a key (what a window shorter than the key sees at the
    marker) and its first token are shared with another key."""
    k, n = key_len(task), SETTINGS.pairs
    for row in batch(task, rows=64).inputs:
        keys = list(pairs_of(row, k, n))
        for i, key in enumerate(keys):
            others = [other for j, other in enumerate(keys) if j != i]
            for length in range(1, k):
                assert any(o[k - length :] == key[k - length :] for o in others), \
                    f"{task}: the {length}-token suffix of {key} belongs to it alone"
            assert any(o[0] == key[0] for o in others), f"{task}: the first token of {key} belongs to it alone"


def test_the_block_answer_is_the_only_block_holding_every_query_letter():
    s = SETTINGS
    b = batch("block")
    for row, targets, mask in zip(b.inputs, b.targets, b.mask):
        blocks = row[: s.n_blocks * (s.block_len + 1)].view(s.n_blocks, s.block_len + 1)
        assert (blocks[:, -1] == LETTERS + 1).all(), "a block is not closed by the separator"
        q0 = s.n_blocks * (s.block_len + 1) + 1
        query = set(row[q0 : q0 + s.query_len].tolist())
        holding = [blk[:-1].tolist() for blk in blocks if query <= set(blk[:-1].tolist())]
        assert len(holding) == 1, f"{len(holding)} blocks hold the query letters {query}"
        assert targets[mask].tolist() == holding[0]


def test_the_induction_answer_followed_the_only_earlier_occurrence_of_the_gram():
    s = TaskSettings(gram=2, vocab_size=10, pairs=3)  # a small vocabulary: many partial repeats to rule out
    b = batch("induction", settings=s, rows=32)
    w, T = s.gram, s.seq_len
    for row, targets, mask in zip(b.inputs, b.targets, b.mask):
        assert mask.nonzero().flatten().tolist() == [T - 1]
        gram = row[T - w :].tolist()
        earlier = [i for i in range(T - w) if row[i : i + w].tolist() == gram]
        assert len(earlier) == 1, f"the {w}-gram {gram} occurs at {earlier} before the end"
        assert targets[T - 1] == row[earlier[0] + w]


def test_one_correlation_layer_recalls_a_two_token_key_and_one_attention_layer_does_not():
    # 4 pairs, values from 8 tokens. Measured: correlation w = 3 (k + 1) 100%, attention 44%
    # (reading values without a key: the most frequent value in context scores 38%).
    settings = TaskSettings(vocab_size=16, pairs=4)
    rows = {mixer: train_synthetic(SyntheticRun(task="mtk2", mixer=mixer, window=3, n_layer=1, n_embd=32, steps=300,
                                                lr=1e-2, eval_rows=128, settings=settings))
            for mixer in ("correlation", "attention")}
    assert rows["correlation"]["accuracy"] > 0.9, rows["correlation"]["accuracy"]
    assert rows["attention"]["accuracy"] < 0.6, rows["attention"]["accuracy"]
    assert rows["correlation"]["params"] == SyntheticRun(task="mtk2", window=3, n_layer=1, n_embd=32,
                                                         settings=settings).component_config().num_params


@pytest.mark.parametrize("argv,flag", [
    (["--task", "mtk9"], "--task"),
    (["--task", "mtk2", "--width", "40"], "--width"),
    (["--task", "mtk2", "--mixer", "rnn"], "--mixer"),
    (["--task", "mtk2", "--steps", "0"], "--steps"),
    (["--task", "mtk3", "--pairs", "2"], "--pairs"),
    (["--task", "mqar", "--vocab", "11"], "--vocab"),
    (["--grid"], "--out"),
    (["--grid", "--out", "OUT", "--widths", "32,x"], "--widths"),
    (["--grid", "--out", "OUT", "--lrs", "0"], "--lrs"),
])
def test_a_bad_flag_is_a_one_line_error_naming_it(argv, flag, capsys, tmp_path):
    argv = [str(tmp_path) if a == "OUT" else a for a in argv]
    assert cli_main(["synthetic", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"leviathan synthetic: error: {flag}:"), err


def test_one_run_prints_one_result_line(capsys, tmp_path):
    assert cli_main(["synthetic", "--task", "mqar", "--steps", "3", "--width", "16", "--layers", "1",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("mqar correlation w=4 layers=1 width=16"), out
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["steps"] == 3


def test_the_grid_runs_as_a_ray_tune_grid(ray_cluster, tmp_path, capsys):
    argv = ["synthetic", "--grid", "--out", str(tmp_path), "--tasks", "mtk2", "--windows", "2",
            "--layer-counts", "1", "--widths", "16", "--seeds", "1", "--lrs", "1e-3,1e-2", "--steps", "3"]
    assert cli_main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["runner"] == "ray tune"
    assert len(results["sweep"]) == 4 and len(results["rows"]) == 2  # 2 mixers x 2 lrs, then 2 mixers x 1 seed
    assert {r["mixer"] for r in results["rows"]} == {"attention", "correlation"}
    chosen = {c["mixer"]: c["lr"] for c in results["chosen_lr"]}
    for r in results["rows"]:  # each mixer trains at the lr its own sweep picked
        best = max((s for s in results["sweep"] if s["mixer"] == r["mixer"]), key=lambda s: s["accuracy"])
        assert r["lr"] == best["lr"] == chosen["attention" if r["mixer"] == "attention" else "correlation w=2"]
    assert [g["window"] for g in results["goal_4a"]] == [2]  # w = 2 >= k = 2 is compared with attention
    assert "| mtk2 | attention" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "plot.png").stat().st_size > 0
