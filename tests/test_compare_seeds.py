"""Pooling compare.json files over seeds and lrs (benchmarks/compare_seeds.py)."""

import json

import pytest

from benchmarks.compare_seeds import chosen_lrs, paired, pool


def _run(final: float, cpu_per_step: float) -> dict:
    """A run's compare.json entry with a two-point members curve (steps 100 and 200)."""
    losses = [(100, final + 0.5), (200, final)]
    return {
        "phase1_cpu_s": 200 * cpu_per_step,
        "budget_curves": {
            "steps": [(float(s), l) for s, l in losses],
            "time": [(s * cpu_per_step, l) for s, l in losses],
            "flops": [(s * 1e9, l) for s, l in losses],
        },
    }


def _write(tmp_path, seed: int, lr: float, runs: dict) -> str:
    path = tmp_path / f"lr{lr}-seed{seed}.json"
    path.write_text(json.dumps({"seed": seed, "training": {"seq_len": 256, "lr": lr}, "runs": runs}))
    return str(path)


def test_each_mixer_takes_its_own_best_lr_and_pairs_across_files(tmp_path):
    files = [
        _write(tmp_path, 0, 1e-3, {"correlation": _run(5.0, 1.0), "attention": _run(5.2, 1.0)}),
        _write(tmp_path, 0, 3e-3, {"correlation": _run(5.3, 1.0), "attention": _run(5.1, 1.0)}),
        _write(tmp_path, 1, 1e-3, {"correlation": _run(5.05, 2.0)}),
        _write(tmp_path, 1, 3e-3, {"attention": _run(5.15, 1.0)}),
    ]
    runs = pool(files)
    lrs = chosen_lrs(runs, 256, {})
    assert lrs == {"correlation": 1e-3, "attention": 3e-3}
    result = paired(runs, 256, lrs)
    assert result["seeds"] == [0, 1]
    seed0 = result["per_seed"][0]
    assert seed0["steps"]["gap"] == pytest.approx(5.0 - 5.1)
    # seed 1: correlation costs twice the CPU per step, so equal time reads it at step 100
    seed1 = result["per_seed"][1]
    assert seed1["time"]["at"] == pytest.approx(200.0)
    assert seed1["time"]["loss"]["correlation"] == pytest.approx(5.55)
    assert seed1["cpu_s_per_step"] == {"correlation": 2.0, "attention": 1.0}
    assert chosen_lrs(runs, 256, {"attention": 1e-3})["attention"] == 1e-3


def test_a_run_given_twice_is_refused(tmp_path):
    run = {"correlation": _run(5.0, 1.0)}
    with pytest.raises(SystemExit, match="appears twice"):
        pool([_write(tmp_path, 0, 1e-3, run), str(tmp_path / "lr0.001-seed0.json")])
