"""jobs.tune: strict parameter parsing, and a real 2-trial ASHA sweep of tiny training runs."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from jobs.spec import JobSpec, load_spec
from jobs.tune import Param, TuneError, check_params, main, parse_param, trial_spec


def test_parse_distributions():
    assert parse_param("training.lr=loguniform(1e-4,1e-2)") == Param("training.lr", "loguniform", (1e-4, 1e-2))
    assert parse_param("window=choice(1, 2, 4)") == Param("ensemble.window", "choice", (1, 2, 4))
    assert parse_param("ensemble.merge_width=choice(32,64)").args == (32, 64)
    assert parse_param("training.joint=choice(true,false)").args == (True, False)
    assert parse_param("ensemble.merge=choice(fusion,mixture)").args == ("fusion", "mixture")
    assert parse_param("seed=randint(0,10)") == Param("seed", "randint", (0, 10))
    assert parse_param("training.weight_decay=uniform(0,0.2)").bounds() == [0, 0.2]


@pytest.mark.parametrize(
    "text, message",
    [
        ("training.lr", "NAME=DIST"),
        ("training.lr=gauss(0,1)", "distribution must be one of"),
        ("training.lr=loguniform(1e-2,1e-4)", "low < high"),
        ("training.lr=loguniform(0,1e-2)", "0 < low"),
        ("training.lr=uniform(1)", "two numbers"),
        ("seed=randint(0,2.5)", "two integers"),
        ("window=choice()", "at least one value"),
        ("window=choice(1,1)", "twice"),
        ("window=choice([1],2)", "not a number"),
        ("training.lr=loguniform(1e-4,1e-2", "distribution must be one of"),
    ],
)
def test_bad_distributions_are_refused(text, message):
    with pytest.raises(TuneError, match=message):
        parse_param(text)


def test_params_are_checked_against_the_spec():
    spec = JobSpec(name="base")
    check_params(spec, [parse_param("lr=loguniform(1e-4,1e-2)"), parse_param("merge_width=choice(32,64)")])
    cases = [
        ("training.lrr=uniform(0.1,0.2)", "no field 'training.lrr'"),
        ("trainin.lr=uniform(0.1,0.2)", "no section 'trainin'"),
        ("window=choice(0,2)", "ensemble.window"),  # window >= 1
        ("merge_width=choice(30,64)", "merge_width"),  # not divisible by merge_heads
        ("name=choice(a,b)", "cannot be swept"),
    ]
    for text, message in cases:
        with pytest.raises(TuneError, match=message):
            check_params(spec, [parse_param(text)])
    s = trial_spec(spec.model_dump(mode="json"), {"training.lr": 0.01, "ensemble.window": 2})
    assert s.training.lr == 0.01 and s.ensemble.window == 2 and s.name == "base"


def test_cli_errors_are_one_line(tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(JobSpec(name="s", storage=str(tmp_path)).to_json())
    assert main(["--spec", str(spec), "--trials", "2", "--param", "lr=loguniform(1,0.1)"]) == 2
    err = capsys.readouterr().err
    assert "low < high" in err and err.count("\n") == 1
    assert main(["--spec", str(spec), "--trials", "2"]) == 2
    assert "no --param" in capsys.readouterr().err
    assert main(["--spec", str(tmp_path / "missing.toml"), "--trials", "1", "--param", "lr=uniform(0.1,0.2)"]) == 2
    assert "spec file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_two_trial_sweep(ray_cluster, small_corpus, tmp_path, capsys):
    manifest = small_corpus
    spec = JobSpec.model_validate({
        "name": "sweep",
        "storage": str(tmp_path / "runs"),
        "data": {"manifest": str(manifest)},
        "ensemble": {"modules": 2, "members_per_module": 1, "members": [{"preset": "tiny"}],
                     "merge_width": 32, "merge_heads": 4},
        "training": {"phase1_steps": 4, "phase2_steps": 2, "batch_size": 2, "seq_len": 32,
                     "eval_interval": 2, "checkpoint_interval": 2, "eval_batches": 1, "warmup_steps": 1},
        "resources": {"workers": 1, "max_failures": 0},
    })
    spec_file = tmp_path / "sweep.json"
    spec_file.write_text(spec.to_json())
    rc = main([
        "--spec", str(spec_file), "--trials", "2", "--max-concurrent", "2",
        "--param", "training.lr=loguniform(1e-3,1e-2)",
        "--param", "ensemble.window=choice(1,2)",
        "--param", "ensemble.merge_width=choice(16,32)",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out
    folder = tmp_path / "runs" / "sweep-tune"
    results = json.loads((folder / "results.json").read_text())
    rows = results["rows"]
    assert len(rows) == 2 and "mixed_val_loss" in out
    finished = [r for r in rows if r["status"] == "finished"]
    assert finished and finished[0] is rows[0], rows
    losses = [r["mixed_val_loss"] for r in finished]
    assert losses == sorted(losses)
    for r in rows:
        assert r["status"] != "error", r["error"]
        assert 1e-3 <= r["params"]["training.lr"] <= 1e-2
        assert r["params"]["ensemble.window"] in (1, 2) and r["params"]["ensemble.merge_width"] in (16, 32)
        # Each trial is a real training run with its own metrics in train-<trial id>/.
        lines = (folder / f"train-{r['trial_id']}" / "metrics.jsonl").read_text().splitlines()
        assert any(json.loads(line).get("mixed_val_loss") is not None for line in lines)
    best = load_spec(folder / "best_spec.toml")
    assert best.name == "sweep-best" and best.storage == spec.storage
    assert best.training.lr == pytest.approx(rows[0]["params"]["training.lr"])
    assert best.ensemble.window == rows[0]["params"]["ensemble.window"]
    assert best.ensemble.merge_width == rows[0]["params"]["ensemble.merge_width"]
    assert tomllib.loads((folder / "best_spec.toml").read_text())["training"]["phase1_steps"] == 4
    assert json.loads((folder / "best_spec.json").read_text())["name"] == "sweep-best"
    assert Path(results["best"]["spec_toml"]) == folder / "best_spec.toml"
