"""jobs.evaluate on a real run folder: a saved tiny ensemble, its tokenizer and spec (DESIGN section 7, "Runs on disk")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.plan import ensemble_config
from jobs.evaluate import evaluate_run, main
from jobs.spec import JobSpec
from leviathan.data.staging import load_manifest
from leviathan.model.ensemble import LeviathanEnsemble


def make_run(
    root: Path, manifest_path: Path, name: str = "tiny", merge: str = "fusion", seed: int = 0, mixer: str = "correlation"
) -> Path:
    """`<root>/<name>/` with spec.json and final/ (ensemble + tokenizer + spec), as training leaves it."""
    manifest = load_manifest(manifest_path)
    spec = JobSpec.model_validate(
        {
            "name": name,
            "storage": str(root),
            "data": {"manifest": str(manifest_path)},
            "ensemble": {
                "modules": 2,
                "members_per_module": 2,
                "members": [{"preset": "tiny"}, {"preset": "tiny", "flavour": "relu3"}],
                "merge": merge,
                "mixer": mixer,
                "merge_width": 32,
            },
            "training": {"batch_size": 2, "seq_len": 32},
        }
    )
    run = Path(spec.run_dir)
    final = run / "final"
    torch.manual_seed(seed)
    LeviathanEnsemble(ensemble_config(spec, manifest.vocab_size)).save(final)
    manifest.tokenizer().save(final)
    (final / "spec.json").write_text(spec.to_json())
    (run / "spec.json").write_text(spec.to_json())
    return run


@pytest.fixture
def corpus(small_corpus) -> Path:
    return small_corpus


def test_evaluate_run_writes_the_reports(tmp_path, corpus, capsys):
    run = make_run(tmp_path, corpus)
    assert main(["--run", str(run), "--max-batches", "1"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    md = (run / "report.md").read_text()
    assert [r["name"] for r in report["rows"]] == ["merged", "merged (no state)", "m0.0", "m0.1", "m1.0", "m1.1",
                                                   "uniform", "posterior", "running posterior", "fixed share",
                                                   "decayed posterior"]
    assert report["settings"]["seq_len"] == 32 and report["settings"]["batch_size"] == 2  # the run's values
    assert report["run"]["name"] == "tiny"
    for text in (out, md):
        assert "| posterior" in text and "Bits per byte" in text and "mixed" in text
    # Called again (e.g. by training at the end) it gives the same numbers.
    again = evaluate_run(run, max_batches=1)
    assert again["rows"] == report["rows"]


def test_attention_twin_row(tmp_path, corpus, capsys):
    run = make_run(tmp_path, corpus, name="corr")
    twin = make_run(tmp_path, corpus, name="att", mixer="attention", seed=1)
    assert main(["--run", str(run), "--twin", str(twin), "--max-batches", "1"]) == 0
    assert "twin: merged, attention" in capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    twin_row = report["rows"][-1]
    assert (twin_row["name"], twin_row["mixer"], twin_row["run"]) == ("twin", "attention", "att")
    # The twin's row is its own merged model on the same windows.
    alone = evaluate_run(twin, max_batches=1)
    assert alone["rows"][0]["loss"] == twin_row["loss"]
    assert report["rows"][0]["loss"] != twin_row["loss"]
    assert "twin: merged, attention" in (run / "report.md").read_text()


def test_evaluate_run_on_a_uri(tmp_path, corpus):
    run = make_run(tmp_path, corpus)
    report = evaluate_run(run.as_uri(), max_batches=1, batch_size=1, seq_len=16)
    assert report["run"]["dir"] == run.as_uri()
    assert json.loads((run / "report.json").read_text())["rows"] == report["rows"]
    assert (run / "report.md").is_file()


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_unusable_runs_are_one_line_errors(tmp_path, corpus, capsys):
    assert "run folder not found" in _error(capsys, ["--run", str(tmp_path / "nope")])
    (tmp_path / "training").mkdir()
    assert "no final/" in _error(capsys, ["--run", str(tmp_path / "training")])
    run = make_run(tmp_path, corpus)
    weights = run / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert "model.safetensors" in _error(capsys, ["--run", str(run)])
    run = make_run(tmp_path, corpus, name="other")
    assert "prefix_tokens" in _error(capsys, ["--run", str(run), "--prefix-tokens", "40"])
