"""jobs.generate: seeded sampling from a run's final ensemble or one member."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.generate import generate_text, main
from leviathan.model.ensemble import LeviathanEnsemble
from leviathan.data.tokenizer import ByteTokenizer
from tests.test_evaluate_job import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_corpus) -> Path:
    return make_run(tmp_path_factory.mktemp("gen"), small_corpus)


def test_same_seed_same_text(run):
    a = generate_text(run, "def ", max_new_tokens=24, seed=3, top_k=20)
    b = generate_text(run, "def ", max_new_tokens=24, seed=3, top_k=20)
    c = generate_text(run, "def ", max_new_tokens=24, seed=4, top_k=20)
    assert a == b
    assert a != c, "another seed should sample other tokens from a near-uniform fresh model"


def test_text_is_the_models_own_cached_sample(run):
    """The CLI path gives exactly what the loaded model's generate gives for that seed."""
    ensemble = LeviathanEnsemble.load(run / "final")
    tok = ByteTokenizer()
    for member in (None, "m1.0"):
        model = ensemble if member is None else ensemble.members[ensemble.member_names.index(member)]
        g = torch.Generator().manual_seed(7)
        ids = model.generate(torch.tensor([tok.encode("abc")]), 16, temperature=0.8, generator=g)[0, 3:]
        expected = tok.decode(ids.tolist())
        assert generate_text(run, "abc", max_new_tokens=16, temperature=0.8, seed=7, member=member) == expected
    greedy = generate_text(run, "abc", max_new_tokens=8, temperature=0.0, member="m0.1", seed=1)
    assert greedy == generate_text(run, "abc", max_new_tokens=8, temperature=0.0, member="m0.1", seed=2)


def test_cli_prints_prompt_and_continuation(run, capsys):
    assert main(["--run", str(run), "--prompt", "hello", "--max-new-tokens", "5", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hello")
    assert out == "hello" + generate_text(run, "hello", max_new_tokens=5, seed=1) + "\n"
    assert main(["--run", str(run), "--max-new-tokens", "3"]) == 0  # empty prompt: a new document


def test_bad_member_and_settings_are_one_line_errors(run, tmp_path, capsys):
    assert main(["--run", str(run), "--prompt", "x", "--member", "m9.9"]) == 2
    err = capsys.readouterr().err
    assert "m9.9" in err and "m0.0, m0.1, m1.0, m1.1" in err and err.count("\n") == 1
    assert main(["--run", str(run), "--prompt", "x", "--top-k", "0"]) == 2
    assert "top_k" in capsys.readouterr().err
    assert main(["--run", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_a_residual_run_samples_its_corrected_mixture(tmp_path, small_corpus):
    """A run whose merger carries the residual (a logit correction on the mixture) generates
    through the cached decode: greedy continuation = argmax of the full forward, token by token,
    and the CLI path gives the loaded model's own seeded sample."""
    from jobs.spec import JobSpec

    run = make_run(tmp_path, small_corpus, name="residual", merge="mixture")
    spec = JobSpec.model_validate_json((run / "spec.json").read_text())
    spec.ensemble.residual = True
    for path in (run / "spec.json", run / "final" / "spec.json"):
        path.write_text(spec.to_json())
    ens = LeviathanEnsemble(spec.ensemble.to_config(ensemble_vocab(run), spec.block_size))
    torch.manual_seed(2)
    with torch.no_grad():
        ens.merger.res_head.weight.normal_(std=0.5)
    ens.save(run / "final")
    model = LeviathanEnsemble.load(run / "final")
    assert model.config.residual

    tok = ByteTokenizer()
    prompt = torch.tensor([tok.encode("abc")])
    greedy = model.generate(prompt, 8, temperature=0.0)
    with torch.no_grad():
        for t in range(3, greedy.shape[1]):
            logits, _ = model(greedy[:, :t])
            assert int(logits[0, -1].argmax()) == int(greedy[0, t]), f"token {t}"
    g = torch.Generator().manual_seed(5)
    expected = tok.decode(model.generate(prompt, 12, temperature=0.9, generator=g)[0, 3:].tolist())
    assert generate_text(run, "abc", max_new_tokens=12, temperature=0.9, seed=5) == expected


def ensemble_vocab(run: Path) -> int:
    return LeviathanEnsemble.load(run / "final").config.vocab_size
