"""leviathan.evaluation on a freshly initialised tiny ensemble and a tiny prepared corpus."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leviathan.config import ComponentConfig, EnsembleConfig
from leviathan.data.staging import load_manifest
from leviathan.model.ensemble import LeviathanEnsemble
from leviathan.evaluation import (
    MIXED,
    RUNNING_POSTERIOR,
    SWITCH,
    EvaluationError,
    evaluate_ensemble,
    format_report,
    mix_members,
    row,
    row_names,
    running_posterior,
    score_batch,
)
from leviathan.baselines import ALPHA_GRID
from leviathan.run.names import BASELINES, DECAYED_POSTERIOR, FIXED_SHARE, NO_STATE, SWITCH_PRE
from tests.test_ensemble import naive_running_posterior

WORDS = {
    "prose": "the a river stone light morning quiet walked over under said again long".split(),
    "code": "def return self if else for in import None True x y value items".split(),
}


def write_corpus(root: Path, n_bytes: int = 6000, seed: int = 0) -> dict[str, Path]:
    """A few KB of text per domain, each domain with its own vocabulary (several documents)."""
    rng = random.Random(seed)
    out = {}
    for domain, words in WORDS.items():
        folder = root / "text" / domain
        folder.mkdir(parents=True)
        for doc in range(6):
            text, size = [], 0
            while size < n_bytes // 6:
                line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + "\n"
                text.append(line)
                size += len(line)
            (folder / f"doc{doc}.txt").write_text("".join(text))
        out[domain] = folder
    return out


def prepare_corpus(root: Path, tokenizer: str = "byte", **kwargs) -> Path:
    from jobs.prepare import prepare

    return prepare(
        write_corpus(root), root / f"prepared-{tokenizer}", tokenizer=tokenizer, val_fraction=0.3, seq_len=64, **kwargs
    )


def tiny_ensemble(vocab_size: int = 260, merge: str = "fusion", modules: int = 2, per_module: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    member = ComponentConfig.preset("tiny", vocab_size=vocab_size, block_size=64, n_layer=1)
    config = EnsembleConfig(
        members=[member] * per_module, modules=modules, members_per_module=per_module, merge=merge, merge_width=32
    )
    return LeviathanEnsemble(config)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return load_manifest(prepare_corpus(tmp_path_factory.mktemp("corpus")))


def residual_ensemble(seed: int = 0) -> LeviathanEnsemble:
    """`tiny_ensemble`'s mixture with the residual, its correction away from the zero init."""
    torch.manual_seed(seed)
    member = ComponentConfig.preset("tiny", vocab_size=260, block_size=64, n_layer=1)
    ens = LeviathanEnsemble(EnsembleConfig(members=[member] * 2, modules=2, members_per_module=2, merge="mixture",
                                           merge_width=32, residual=True))
    with torch.no_grad():
        ens.merger.res_head.weight.normal_(std=0.2)
    return ens


@pytest.mark.parametrize("merge", ["fusion", "mixture", "residual"])
def test_rows_match_the_models_own_losses(merge):
    """merged = the ensemble's forward loss, member rows = each member's forward loss (prefix 0);
    residual: the mixture with its logit correction, scored on the members' full log-probs."""
    ens = (residual_ensemble() if merge == "residual" else tiny_ensemble(merge=merge)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 260, (3, 16), generator=g)
    y = torch.randint(0, 260, (3, 16), generator=g)
    nll, *_ = score_batch(ens, x, y, prefix_tokens=0)  # (R, B)
    assert nll.shape == (len(row_names(ens)), 3)
    with torch.no_grad():
        _, loss = ens(x, y)
        assert nll[0].sum() / y.numel() == pytest.approx(loss.item(), rel=1e-5)
        for i, member in enumerate(ens.members):
            _, member_loss = member(x, y)
            assert nll[2 + i].sum() / y.numel() == pytest.approx(member_loss.item(), rel=1e-5), ens.member_names[i]


def test_prefix_tokens_are_excluded_from_every_row():
    ens = tiny_ensemble().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 260, (2, 16), generator=g)
    y = torch.randint(0, 260, (2, 16), generator=g)
    P = 5
    nll, *_ = score_batch(ens, x, y, prefix_tokens=P)
    with torch.no_grad():
        logits, _ = ens.members[0](x)
    per_token = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
    assert torch.allclose(nll[2], per_token[:, P:].sum(dim=1).double(), rtol=1e-5)
    y2 = y.clone()
    y2[:, :P] = (y2[:, :P] + 7) % 260  # other prefix targets change the posterior weights only
    nll2, *_ = score_batch(ens, x, y2, prefix_tokens=P)
    # Members and uniform: no; the posteriors, the tracking baselines and the evidence merger read
    # the earlier targets.
    names = row_names(ens)
    fixed = slice(names.index(ens.member_names[0]), names.index("uniform") + 1)
    assert torch.equal(nll[fixed], nll2[fixed]), "member and uniform rows must not depend on the prefix targets"


def test_posterior_follows_the_member_that_explains_the_prefix():
    B, T, M, P = 2, 10, 3, 4
    member_lp = torch.full((B, T, M), math.log(0.1))
    member_lp[0, :, 1] = math.log(0.9)  # window 0: member 1 predicts every target well
    member_lp[1, :, 2] = math.log(0.9)  # window 1: member 2 does
    uniform, posterior, log_w = mix_members(member_lp, P)
    w = log_w.exp()
    assert torch.allclose(w.sum(dim=-1), torch.ones(B))
    assert w[0].argmax() == 1 and w[1].argmax() == 2
    assert w[0, 1] > 0.99, f"posterior after {P} tokens: {w[0].tolist()}"
    assert torch.allclose(uniform, torch.full((B, T), math.log((0.9 + 0.1 + 0.1) / 3)))
    assert (posterior > uniform).all()
    _, flat, log_w0 = mix_members(member_lp, 0)  # no prefix: the uniform prior
    assert torch.allclose(flat, uniform) and torch.allclose(log_w0.exp(), torch.full((B, M), 1 / M))


def test_running_posterior_is_the_per_token_bayes_posterior():
    g = torch.Generator().manual_seed(3)
    member_lp = F.log_softmax(3 * torch.randn(2, 30, 3, 5, generator=g, dtype=torch.float64), dim=-1)[..., 0]
    lp, log_w = running_posterior(member_lp)
    torch.testing.assert_close(lp, naive_running_posterior(member_lp), atol=1e-10, rtol=0)
    assert torch.allclose(log_w[:, 0].exp(), torch.full((2, 3), 1 / 3, dtype=torch.float64))


def test_report_on_a_prepared_corpus(manifest):
    ens = tiny_ensemble()
    rep = evaluate_ensemble(ens, manifest, batch_size=2, seq_len=32, max_batches=2, prefix_tokens=8)
    domains = manifest.domains[:2]
    assert rep["columns"] == [*domains, MIXED, SWITCH, SWITCH_PRE]
    names = ["merged", NO_STATE, "m0.0", "m0.1", "m1.0", "m1.1", "uniform", "posterior", RUNNING_POSTERIOR,
             FIXED_SHARE, DECAYED_POSTERIOR]
    assert [r["name"] for r in rep["rows"]] == names
    assert [r["domain"] for r in rep["rows"]] == [None, None, domains[0], domains[0], domains[1], domains[1]] + [None] * 5
    k = rep["settings"]["windows_per_domain"]
    assert rep["tokens"][MIXED] == 2 * k * 24 and rep["tokens"][domains[0]] == k * 24
    # 32 windows per ordered pair; every scored target is either before or after its window's cut.
    assert rep["settings"]["switch_windows"] == 2 * 32
    assert rep["tokens"][SWITCH] + rep["tokens"][SWITCH_PRE] == 64 * 24
    assert 0 < rep["tokens"][SWITCH_PRE] < rep["tokens"][SWITCH]
    assert rep["baselines"]["tuned"] and rep["baselines"]["alpha"] in ALPHA_GRID
    assert set(rep["gaps"]) == set(rep["columns"])
    for c, gap in rep["gaps"].items():
        best = min((r for r in rep["rows"] if r["kind"] in BASELINES), key=lambda r: r["loss"][c])
        assert gap["best_baseline"] == best["name"]
        assert gap["gap"] == pytest.approx(row(rep, "merged")["loss"][c] - best["loss"][c], abs=1e-9)
        assert gap["ci95"][0] <= gap["gap"] <= gap["ci95"][1], (c, gap)
    for r in rep["rows"]:
        for c in rep["columns"]:
            loss = r["loss"][c]
            # A fresh model predicts close to uniform over the 260 byte ids.
            assert 4.0 < loss < 7.0, (r["name"], c, loss)
            assert r["ppl"][c] == pytest.approx(math.exp(loss))
            # Byte tokenizer: one token per byte plus one end-of-text token per document.
            if c in domains:
                bpt = manifest.bytes_per_token(c, "val")
                assert r["bpb"][c] == pytest.approx(loss / bpt / math.log(2)), (r["name"], c)
            bpt = loss / r["bpb"][c] / math.log(2)
            assert 0.9 < bpt <= 1.0, (r["name"], c)
        # Every domain is scored on k windows: the mixed set's loss is the domains' mean.
        assert r["loss"][MIXED] == pytest.approx((r["loss"][domains[0]] + r["loss"][domains[1]]) / 2)
    # The uniform mixture is never worse than the average member (Jensen), per column.
    for c in rep["columns"]:
        avg = sum(row(rep, n)["loss"][c] for n in ens.member_names) / 4
        assert row(rep, "uniform")["loss"][c] <= avg + 1e-9
    for d in domains:
        assert sum(rep["posterior_weights"][d].values()) == pytest.approx(1.0)
        assert sum(rep["merger_weights"][d].values()) == pytest.approx(1.0)
        assert sum(rep["running_posterior_weights"][d].values()) == pytest.approx(1.0)
    assert rep["evidence"] == {"beta": [1.0] * 4, "gamma": [1.0] * 4}
    again = evaluate_ensemble(ens, manifest, batch_size=2, seq_len=32, max_batches=2, prefix_tokens=8)
    assert again["rows"] == rep["rows"], "evaluation must be deterministic"
    md = format_report(rep, title="t")
    for name in ["merged", "m1.1", "uniform", "posterior", RUNNING_POSTERIOR, FIXED_SHARE, DECAYED_POSTERIOR,
                 NO_STATE, "Bits per byte", "Best baseline", "Merged minus best baseline", *domains, MIXED,
                 SWITCH, SWITCH_PRE]:
        assert name in md


def test_bits_per_byte_uses_the_manifests_bytes_per_token(tmp_path):
    manifest = load_manifest(prepare_corpus(tmp_path, tokenizer="bpe", vocab_size=300))
    ens = tiny_ensemble(vocab_size=manifest.vocab_size, modules=1, per_module=1)
    rep = evaluate_ensemble(ens, manifest, ["code"], batch_size=2, seq_len=16, max_batches=1)
    ratio = manifest.bytes_per_token("code", "val")
    assert ratio > 1.5, "BPE on this corpus should merge bytes"
    merged = row(rep, "merged")
    assert merged["bpb"]["code"] == pytest.approx(merged["loss"]["code"] / ratio / math.log(2))
    assert rep["bytes_per_token"]["code"] == pytest.approx(ratio)


def test_bad_settings_name_the_problem(manifest):
    ens = tiny_ensemble()
    with pytest.raises(EvaluationError, match="seq_len"):
        evaluate_ensemble(ens, manifest, seq_len=65)
    with pytest.raises(EvaluationError, match="prefix_tokens"):
        evaluate_ensemble(ens, manifest, seq_len=16, prefix_tokens=16)
    with pytest.raises(EvaluationError, match="not in manifest"):
        evaluate_ensemble(ens, manifest, ["prose", "poetry"], seq_len=16)
    with pytest.raises(EvaluationError, match="vocab_size"):
        evaluate_ensemble(tiny_ensemble(vocab_size=300), manifest, seq_len=16)


def test_without_phase_2_the_report_has_no_merged_row_and_no_verdict(manifest):
    """phase2_steps = 0 (every comparison run): the merger never trained, so the report,
    its final-table view and the printed table leave the merged model out entirely."""
    from leviathan.run.report import final_table, format_final_table

    ens = tiny_ensemble()
    rep = evaluate_ensemble(ens, manifest, seq_len=16, batch_size=2, max_batches=1, merged=False)
    assert [r["name"] for r in rep["rows"]] == [*ens.member_names, *BASELINES]
    assert "merger_weights" not in rep and rep["evidence"] is None and rep["gaps"] == {}
    table = final_table(rep)
    assert not any(k.startswith("merged_beats") for k in table)
    text = format_final_table(table)
    assert "merged" not in text and "uniform" in text
    assert "merged" not in format_report(rep)

    # With the merger, the same member figures, a merged row first and the verdicts.
    full = evaluate_ensemble(ens, manifest, seq_len=16, batch_size=2, max_batches=1)
    assert [r["name"] for r in full["rows"][:2]] == ["merged", NO_STATE] and full["rows"][2:] == rep["rows"]
    table = final_table(full)
    assert table["rows"][0]["kind"] == "merged" and "merged_beats_every_member" in table
    assert "merged model beats every member" in format_final_table(table)
    member = table["rows"][2]
    assert member["own_val_loss"] == row(full, member["name"])["loss"][member["domain"]]


def test_report_scores_the_residual_correction(manifest):
    """A residual merger's report: with the correction at its zero init every row equals the
    plain mixture's report; a learned correction moves the merged rows and nothing else."""
    settings = dict(seq_len=16, batch_size=2, max_batches=1, prefix_tokens=4)
    plain = tiny_ensemble(merge="mixture")
    residual = residual_ensemble()
    with torch.no_grad():
        residual.merger.res_head.weight.zero_()
    residual.load_state_dict(plain.state_dict(), strict=False)  # same members, projections and merger
    base = evaluate_ensemble(plain, manifest, **settings)
    rep = evaluate_ensemble(residual, manifest, **settings)
    for a, b in zip(base["rows"], rep["rows"]):
        assert a["name"] == b["name"]
        for c in base["columns"]:
            assert b["loss"][c] == pytest.approx(a["loss"][c], abs=1e-5), (a["name"], c)
    with torch.no_grad():
        residual.merger.res_head.weight.normal_(std=0.2)
    moved = evaluate_ensemble(residual, manifest, **settings)
    for a, b in zip(base["rows"], moved["rows"]):
        changed = any(abs(b["loss"][c] - a["loss"][c]) > 1e-4 for c in base["columns"])
        assert changed == (a["name"] in ("merged", NO_STATE)), a["name"]
