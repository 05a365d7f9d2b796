"""jobs.compare: one training run per mixer, evaluated and reported side by side."""

from __future__ import annotations

import json

import pytest

from jobs.compare import CompareError, curves, main, parse_mixers, spec_for_mixer
from jobs.spec import JobSpec
from tests.test_evaluation import prepare_corpus


def test_parse_mixers():
    assert parse_mixers("correlation,attention") == ["correlation", "attention"]
    assert parse_mixers(" attention ") == ["attention"]
    for bad in ("correlation,conv", "", "attention,attention"):
        with pytest.raises(CompareError, match="--mixers"):
            parse_mixers(bad)


def test_runs_differ_in_the_mixer_only():
    spec = JobSpec(name="base", seed=7)
    a, c = spec_for_mixer(spec, "attention"), spec_for_mixer(spec, "correlation")
    assert (a.name, c.name) == ("base-attention", "base-correlation")
    assert (a.ensemble.mixer, c.ensemble.mixer) == ("attention", "correlation")
    da, dc = a.model_dump(), c.model_dump()
    for d in (da, dc):
        d.pop("name")
        d["ensemble"].pop("mixer")
    assert da == dc
    with pytest.raises(CompareError, match="name"):
        spec_for_mixer(JobSpec(name="x" * 60), "correlation")


def test_curves_put_phase_two_after_phase_one():
    records = [
        {"phase": "members", "step": 2, "member": "m0.0", "val_loss": 5.0},
        {"phase": "members", "step": 2, "member": "m1.0", "val_loss": 4.0},
        {"phase": "members", "step": 2, "member": "uniform", "mixed_val_loss": 4.8},
        {"phase": "merge", "step": 2, "member": "merger", "mixed_val_loss": 4.5},
        {"phase": "merge", "step": 2, "member": "uniform", "mixed_val_loss": 4.7},
        {"phase": "final", "step": 2, "member": "merger", "mixed_val_loss": 4.5},
        {"phase": "done", "step": 2},
    ]
    c = curves(records, phase1_steps=4)
    assert c["members"] == [(2, 4.5)]
    assert c["m0.0"] == [(2, 5.0)]
    assert c["uniform"] == [(2, 4.8), (6, 4.7)]
    assert c["merged"] == [(6, 4.5)]


def test_cli_errors_are_one_line(tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(JobSpec(name="s", storage=str(tmp_path)).to_json())
    assert main(["--spec", str(spec), "--mixers", "conv"]) == 2
    err = capsys.readouterr().err
    assert "--mixers" in err and err.count("\n") == 1
    assert main(["--spec", str(tmp_path / "nope.toml")]) == 2
    assert "spec file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_correlation_and_attention(ray_cluster, tmp_path, capsys):
    manifest = prepare_corpus(tmp_path)
    spec = JobSpec.model_validate({
        "name": "cmp",
        "seed": 3,
        "storage": str(tmp_path / "runs"),
        "data": {"manifest": str(manifest)},
        "ensemble": {"modules": 2, "members_per_module": 1, "members": [{"preset": "tiny"}],
                     "window": 4, "merge_width": 32, "merge_heads": 4},
        "training": {"phase1_steps": 4, "phase2_steps": 2, "batch_size": 2, "seq_len": 32,
                     "eval_interval": 2, "checkpoint_interval": 4, "eval_batches": 1, "warmup_steps": 1},
        "resources": {"workers": 1, "max_failures": 0},
    })
    spec_file = tmp_path / "cmp.json"
    spec_file.write_text(spec.to_json())
    assert main(["--spec", str(spec_file), "--max-batches", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "cmp-compare"
    result = json.loads((folder / "compare.json").read_text())
    assert list(result["runs"]) == ["correlation", "attention"]
    corr, att = result["runs"]["correlation"], result["runs"]["attention"]
    # Equal parameters up to the lag weights: 2 layers x 4 heads x w=4 per member, 4 x 4 in the merger.
    assert corr["params"]["lag_weights"] == 2 * (2 * 4 * 4) + 4 * 4
    assert att["params"]["lag_weights"] == 0
    assert corr["params"]["total"] - att["params"]["total"] == corr["params"]["lag_weights"]
    for run in (corr, att):
        assert (tmp_path / "runs" / run["name"] / "final").is_dir()
        assert (tmp_path / "runs" / run["name"] / "report.json").is_file()
        assert set(run["merged"]["loss"]) == {*manifest_domains(manifest), "mixed", "switch"}
        assert run["wall_s"] > 0 and run["tokens_per_s"]["members"] > 0
        assert run["curves"]["members"] and run["curves"]["merged"]
    # Both runs are scored on the same windows of the same data.
    reports = [json.loads((tmp_path / "runs" / r["name"] / "report.json").read_text()) for r in (corr, att)]
    same = [{k: v for k, v in r["settings"].items() if k != "mixer"} for r in reports]
    assert reports[0]["tokens"] == reports[1]["tokens"] and same[0] == same[1]
    assert [r["settings"]["mixer"] for r in reports] == ["correlation", "attention"]
    for name in ("loss-correlation.png", "loss-attention.png", "loss-together.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # Each run's report.md carries the other's merged model as its twin row.
    assert "twin: merged, attention" in (tmp_path / "runs" / "cmp-correlation" / "report.md").read_text()
    assert "twin: merged, correlation" in (tmp_path / "runs" / "cmp-attention" / "report.md").read_text()
    md = (folder / "compare.md").read_text()
    assert "| correlation" in md and "| attention" in md and "posterior" in md
    assert md in out


def manifest_domains(manifest_path) -> list[str]:
    return [d["name"] for d in json.loads(manifest_path.read_text())["domains"]]
