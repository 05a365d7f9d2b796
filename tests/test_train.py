"""`jobs.train`: the session's trained run end to end (tests/conftest.py), and
the errors that must come before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leviathan.run.records import RECORD_FIELDS
from jobs import train
from jobs.spec import SpecError
from tests.scripts.common import MERGED, logged_steps, tiny_spec, write_spec
from leviathan.run.names import BASELINES, NO_STATE


@pytest.fixture
def manifest(builtin_corpus) -> Path:
    return builtin_corpus


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_small_job_trains_both_phases_and_leaves_a_loadable_final_model(trained_run):
    """The session's trained run (`python -m jobs.train` in a subprocess): its table, final/,
    report, metrics contract and checkpoints."""
    from cluster.checkpointing import MERGER_FILE, module_file, read_state
    from leviathan.model.ensemble import LeviathanEnsemble
    from leviathan.data.tokenizer import load_tokenizer

    spec, run, result = trained_run.spec, trained_run.run, trained_run.result
    p1, p2 = spec.training.phase1_steps, spec.training.phase2_steps
    members = ["m0.0", "m0.1", "m1.0", "m1.1"]

    # The table: the merged model and its no-state ablation, 4 members, the training-free baselines.
    kinds = [r["kind"] for r in result["rows"]]
    assert kinds == [MERGED, NO_STATE] + ["member"] * 4 + list(BASELINES), kinds
    assert [r["name"] for r in result["rows"][2:6]] == members
    assert result["report"]["baselines"]["tuned"], "the closing table's baselines are tuned on train windows"

    # final/ loads without Ray and predicts.
    ensemble = LeviathanEnsemble.load(run / "final")
    assert ensemble.member_names == members
    assert load_tokenizer(run / "final").vocab_size == ensemble.config.vocab_size
    assert json.loads((run / "final" / "spec.json").read_text())["name"] == spec.name
    assert (run / "report.md").is_file(), "jobs.evaluate wrote the evaluation report"

    # The report was evaluated in a Ray task asking for one worker's resources (a GPU with use_gpu).
    from ray.util.state import list_tasks

    # Every run of the session that got this far made one such task; each asked for one worker's CPU.
    tasks = list_tasks(filters=[("name", "=", train.EVALUATION_TASK)], detail=True)
    assert tasks and all(t.required_resources == {"CPU": 1.0} for t in tasks), tasks
    assert json.loads((run / "report.json").read_text())["run"]["device"] == "cpu"

    # One evaluator: the final table (scored on the workers) and report.json (one process) agree.
    report = {r["name"]: r["loss"] for r in json.loads((run / "report.json").read_text())["rows"]}
    for r in result["rows"]:
        figures = report[r["name"]]
        assert r["mixed_val_loss"] == pytest.approx(figures["mixed"], rel=1e-5), r["name"]
        assert r["switch_val_loss"] == pytest.approx(figures["switch"], rel=1e-5), r["name"]
        for domain, loss in r["val_by_domain"].items():
            assert loss == pytest.approx(figures[domain], rel=1e-5), (r["name"], domain)
    assert result["evidence"] == json.loads((run / "report.json").read_text())["evidence"]
    # train_result.json embeds the workers' report: the same rows, columns and figures as report.json.
    single = json.loads((run / "report.json").read_text())
    assert [r["name"] for r in result["report"]["rows"]] == [r["name"] for r in single["rows"]]
    assert result["report"]["columns"] == single["columns"] and result["report"]["tokens"] == single["tokens"]
    for ours, theirs in zip(result["report"]["rows"], single["rows"]):
        assert (ours["kind"], ours["module"], ours["domain"]) == (theirs["kind"], theirs["module"], theirs["domain"])
        for metric in ("loss", "bpb"):
            assert ours[metric] == pytest.approx(theirs[metric], rel=1e-5), (ours["name"], metric)
    logits, loss = ensemble(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, ensemble.config.vocab_size) and torch.isfinite(loss)

    # metrics.jsonl: the contract's fields, every member at every eval and checkpoint step, then done.
    t = spec.training
    records = _records(run)
    assert records[-1]["phase"] == "done"
    for r in records[:-1]:
        assert tuple(r) == RECORD_FIELDS and r["replayed"] is False
    logged = {(r["member"], r["step"]) for r in records if r["phase"] == "members" and r["module"] is not None}
    assert logged == {(m, s) for m in members for s in logged_steps(p1, t.eval_interval, t.checkpoint_interval)}
    merges = [r["step"] for r in records if r["phase"] == "merge" and r["member"] == MERGED]
    assert merges == sorted(logged_steps(p2, t.eval_interval, t.checkpoint_interval))
    finals = {r["member"] for r in records if r["phase"] == "final"}
    assert finals == {*members, "uniform", MERGED}
    first = next(r for r in records if r["member"] == "m0.0")
    assert first["domain"] == "python" and first["tokens_per_s"] > 0 and first["lr"] > 0

    # Exactly the spec's steps: each module drew p1 batches, the mixed sampler p2.
    ckpt = Path(result["checkpoint"])
    assert read_state(ckpt)["phase"] == "merge" and read_state(ckpt)["step"] == p2
    for i in range(2):
        assert torch.load(ckpt / module_file(i), weights_only=False)["sampler"]["batches_drawn"] == p1
    merger_state = torch.load(ckpt / MERGER_FILE, weights_only=False)
    assert merger_state["mixed_sampler"]["batches_drawn"] == p2
    assert merger_state["mixed_sampler"]["switch_fraction"] == t.switch_fraction
    # The evidence weights are checkpointed with the merger and have moved from (1, 1).
    assert {"beta", "gamma_raw"} <= set(merger_state["merger"])
    assert not torch.equal(merger_state["merger"]["beta"], torch.ones(2))

    # The finished run is not silently trained again.
    with pytest.raises(SpecError, match="already finished"):
        train.run(spec, progress=False)


def test_without_phase_2_no_merged_row_or_verdict_is_printed(ray_cluster, manifest, tmp_path, capsys):
    """phase2_steps = 0 (every comparison run): the merger never trained, so neither the workers'
    table, nor train_result.json, nor report.json, nor the printed table shows a merged row or verdict."""
    spec = tiny_spec(manifest, tmp_path, "no-merge", ensemble={"members_per_module": 1, "members": [{"preset": "tiny"}]},
                     training={"phase1_steps": 2, "phase2_steps": 0, "eval_interval": 2, "checkpoint_interval": 2})
    result = train.run(spec, progress=False)
    run = Path(spec.run_dir)
    assert [r["kind"] for r in result["rows"]] == ["member"] * 2 + list(BASELINES)
    assert not any(k.startswith("merged_beats") for k in result) and result["evidence"] is None
    assert MERGED not in {r["name"] for r in json.loads((run / "report.json").read_text())["rows"]}
    assert MERGED not in {r["member"] for r in _records(run)}
    out = capsys.readouterr().out
    assert "| uniform" in out and f"| {MERGED}" not in out and "merged model beats" not in out, out[-2000:]


def test_run_folder_with_another_spec_is_refused(manifest, tmp_path):
    spec = tiny_spec(manifest, tmp_path, "taken")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "spec.json").write_text(spec.to_json())
    train.check_run_folder(spec)  # the same spec (e.g. written by the API first) resumes
    other = tiny_spec(manifest, tmp_path, "taken", training={"phase1_steps": 7})
    with pytest.raises(SpecError, match="different spec"):
        train.check_run_folder(other)


@pytest.mark.timeout(120)  # a job that waited for a GPU would hang here instead of failing
def test_unplaceable_job_fails_fast_with_a_clear_message(ray_cluster, manifest, tmp_path, capsys):
    spec = tiny_spec(manifest, tmp_path, "gpu", resources={"use_gpu": True})
    code = train.main(["--spec", str(write_spec(spec, tmp_path / "gpu.json"))])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "cannot place job 'gpu'" in err and "GPU" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "change,message",
    [
        ({"data": {"manifest": "/nonexistent/data"}}, "data.manifest: no manifest"),
        ({"ensemble": {"modules": 5}, "resources": {"workers": 2}}, "ensemble.modules: 5 modules"),
        ({"data": {"domains": ["python", "klingon"]}}, "klingon"),
    ],
)
def test_bad_data_fails_before_any_worker_starts(manifest, tmp_path, capsys, change, message):
    spec = tiny_spec(manifest, tmp_path, "bad", **change)
    code = train.main(["--spec", str(write_spec(spec, tmp_path / "bad.json"))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists(), "nothing is written for a job that cannot start"


def test_bad_spec_file_is_a_one_line_error(tmp_path, capsys):
    assert train.main(["--spec", str(tmp_path / "missing.toml")]) == 2
    assert "spec file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[training]\nphase1_steps = -1\nbogus = 1\n')
    assert train.main(["--spec", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "training.phase1_steps" in err and "training.bogus" in err and len(err.splitlines()) == 1


GIANT = Path(__file__).resolve().parents[1] / "jobs" / "specs" / "giant.toml"


def test_giant_spec_refuses_its_placeholders_until_storage_and_data_are_named(tmp_path, capsys):
    assert train.main(["--spec", str(GIANT)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "storage: " in err and "data.manifest: " in err and "still the placeholder" in err
    assert "--storage" in err and "--manifest" in err

    # Named on the command line: the placeholders are gone, and missing data is the next one-line error.
    code = train.main(["--spec", str(GIANT), "--storage", str(tmp_path / "runs"), "--manifest", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "data.manifest: no manifest at" in err, err
    assert not (tmp_path / "runs").exists()


def test_overrides_add_fields_a_spec_file_leaves_out(tmp_path, capsys):
    """--storage / --manifest apply to a spec file without those fields (the demo's shape)."""
    spec_file = tmp_path / "plain.toml"
    spec_file.write_text('name = "plain"\n')
    code = train.main(["--spec", str(spec_file), "--storage", str(tmp_path / "runs"), "--manifest", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "data.manifest: no manifest at" in err and str(tmp_path / "none") in err, err
