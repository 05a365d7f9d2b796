"""jobs.compare: one training run per mixer, evaluated and reported side by side."""

from __future__ import annotations

import json

import pytest

from jobs.compare import (
    BUDGETS,
    CompareError,
    budget_curves,
    curves,
    equal_budget,
    loss_at,
    main,
    parse_mixers,
    phase1_flops_per_step,
    spec_for_mixer,
    with_seed,
)
from jobs.spec import JobSpec
from leviathan.model.flops import flops
from leviathan.run.names import MIXED, SWITCH, SWITCH_PRE


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
        {"phase": "merge", "step": 2, "member": "merged", "mixed_val_loss": 4.5},
        {"phase": "merge", "step": 2, "member": "uniform", "mixed_val_loss": 4.7},
        {"phase": "final", "step": 2, "member": "merged", "mixed_val_loss": 4.5},
        {"phase": "done", "step": 2},
    ]
    c = curves(records, phase1_steps=4)
    assert c["members"] == [(2, 4.5)]
    assert c["m0.0"] == [(2, 5.0)]
    assert c["uniform"] == [(2, 4.8), (6, 4.7)]
    assert c["merged"] == [(6, 4.5)]


def _phase1(step: int, losses: list[float], cpu_s: float) -> list[dict]:
    """One phase-1 report: a line per member and the uniform mixture's, each with the interval's cpu_s."""
    lines = [{"phase": "members", "step": step, "member": f"m{i}.0", "val_loss": v, "cpu_s": cpu_s}
             for i, v in enumerate(losses)]
    return lines + [{"phase": "members", "step": step, "member": "uniform", "mixed_val_loss": 9.0, "cpu_s": cpu_s}]


def test_budget_curves_sum_cpu_time_and_count_flops_per_step():
    records = [*_phase1(10, [5.0, 4.0], 2.0), *_phase1(20, [4.0, 3.0], 3.0), *_phase1(30, [3.0, 2.0], 1.5),
               {"phase": "merge", "step": 5, "member": "merged", "mixed_val_loss": 2.0, "cpu_s": 99.0}]
    c = budget_curves(records, flops_per_step=1000)
    assert c["steps"] == [(10, 4.5), (20, 3.5), (30, 2.5)]
    assert c["flops"] == [(10_000, 4.5), (20_000, 3.5), (30_000, 2.5)]
    assert c["time"] == [(2.0, 4.5), (5.0, 3.5), (6.5, 2.5)], "phase-1 intervals add up; phase 2 is left out"


def test_loss_at_interpolates_between_evaluations():
    curve = [(10.0, 4.0), (20.0, 3.0), (40.0, 2.0)]
    assert loss_at(curve, 10.0) == 4.0 and loss_at(curve, 40.0) == 2.0
    assert loss_at(curve, 15.0) == pytest.approx(3.5)
    assert loss_at(curve, 30.0) == pytest.approx(2.5)
    for outside in (9.0, 41.0):
        with pytest.raises(CompareError, match="outside the evaluated range"):
            loss_at(curve, outside)


def test_equal_budget_reads_both_runs_at_the_cheaper_runs_total():
    runs = {
        "correlation": {"budget_curves": {"time": [(10.0, 4.0), (20.0, 3.0), (30.0, 2.0)]}},
        "attention": {"budget_curves": {"time": [(8.0, 4.2), (16.0, 3.2), (24.0, 2.4)]}},
    }
    e = equal_budget(runs, "time")
    assert e["at"] == 24.0 and e["spent"] == {"correlation": 30.0, "attention": 24.0}
    assert e["loss"]["attention"] == 2.4
    assert e["loss"]["correlation"] == pytest.approx(2.6), "20 -> 30 s: 3.0 -> 2.0, read at 24 s"


def test_phase1_flops_follow_each_members_mixer_path():
    spec = JobSpec.model_validate({
        "name": "f",
        "ensemble": {"modules": 2, "members_per_module": 1, "members": [{"n_layer": 2, "n_head": 2, "n_embd": 32}],
                     "window": 4, "merge_width": 32},
        "training": {"batch_size": 3, "seq_len": 16},
    })
    per_step = {}
    for mixer in ("correlation", "attention"):
        s = spec_for_mixer(spec, mixer)
        config = s.ensemble.to_config()
        ensemble = type("Ensemble", (), {"config": config})()
        per_step[mixer] = phase1_flops_per_step(ensemble, s)
        assert per_step[mixer] == 2 * flops(config.members[0], 16, 3, "cpu")
    assert per_step["correlation"] > per_step["attention"], "the lag window costs score work"


def test_with_seed_names_the_runs_after_the_seed():
    s = with_seed(JobSpec(name="base", seed=0), 5)
    assert (s.seed, s.name, spec_for_mixer(s, "attention").name) == (5, "base-seed5", "base-seed5-attention")


def test_cli_errors_are_one_line(tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(JobSpec(name="s", storage=str(tmp_path)).to_json())
    assert main(["--spec", str(spec), "--mixers", "conv"]) == 2
    err = capsys.readouterr().err
    assert "--mixers" in err and err.count("\n") == 1
    assert main(["--spec", str(tmp_path / "nope.toml")]) == 2
    assert "spec file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--spec", str(spec), "--budget", "wall"])
    assert "--budget" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_correlation_and_attention(ray_cluster, small_corpus, tmp_path, capsys):
    manifest = small_corpus
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
    assert main(["--spec", str(spec_file), "--max-batches", "1", "--no-progress", "--budget", "flops"]) == 0
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
        assert set(run["merged"]["loss"]) == {*manifest_domains(manifest), MIXED, SWITCH, SWITCH_PRE}
        assert run["wall_s"] > 0 and run["tokens_per_s"]["members"] > 0
        assert run["curves"]["members"] and run["curves"]["merged"]
    # Both runs are scored on the same windows of the same data.
    reports = [json.loads((tmp_path / "runs" / r["name"] / "report.json").read_text()) for r in (corr, att)]
    same = [{k: v for k, v in r["settings"].items() if k != "mixer"} for r in reports]
    assert reports[0]["tokens"] == reports[1]["tokens"] and same[0] == same[1]
    assert [r["settings"]["mixer"] for r in reports] == ["correlation", "attention"]
    # Budgets: FLOPs at a step are flops() of every member times the step, on each run's own path;
    # CPU time grows with every phase-1 report; each equal budget is read where both runs reached it.
    assert result["budget"] == "flops"
    for mixer, run in result["runs"].items():
        member = spec_for_mixer(spec, mixer).ensemble.to_config(vocab_size=260).members[0]
        per_step = 2 * flops(member, 32, 2, "cpu")
        assert run["phase1_flops_per_step"] == per_step
        assert run["budget_curves"]["flops"] == [[s * per_step, v] for s, v in run["budget_curves"]["steps"]]
        times = [t for t, _ in run["budget_curves"]["time"]]
        assert len(times) == 2 and 0 < times[0] < times[1] and times[1] == pytest.approx(run["phase1_cpu_s"])
    assert corr["phase1_flops_per_step"] > att["phase1_flops_per_step"]
    for budget in BUDGETS:
        e = result["equal"][budget]
        assert e["at"] == min(e["spent"].values())
        cheaper = min(e["spent"], key=e["spent"].get)
        assert e["loss"][cheaper] == result["runs"][cheaper]["budget_curves"][budget][-1][1]
    assert result["equal"]["steps"]["at"] == 4
    assert result["equal"]["flops"]["at"] == 4 * att["phase1_flops_per_step"]
    assert "flops (chosen)" in md_text(folder)
    for name in ("loss-correlation.png", "loss-attention.png", "loss-together.png", "loss-vs-time.png",
                 "loss-vs-flops.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # Each run's report.md carries the other's merged model as its twin row.
    assert "twin: merged, attention" in (tmp_path / "runs" / "cmp-correlation" / "report.md").read_text()
    assert "twin: merged, correlation" in (tmp_path / "runs" / "cmp-attention" / "report.md").read_text()
    md = (folder / "compare.md").read_text()
    assert "| correlation" in md and "| attention" in md and "posterior" in md
    assert md in out


def md_text(folder) -> str:
    return (folder / "compare.md").read_text()


def manifest_domains(manifest_path) -> list[str]:
    return [d["name"] for d in json.loads(manifest_path.read_text())["domains"]]
