"""Tokens/s per phase and the ETA: folded from metrics records (`leviathan.run.progress`),
shown in the CLI's progress line and bar and in `GET /v1/jobs/{id}`."""

from __future__ import annotations

import json
import uuid

import pytest

from cluster.metrics import MetricsLog, ProgressBar, format_progress
from leviathan.run.progress import RunProgress, format_duration
from leviathan.run.records import done_record, record


def _at(t: float, **fields) -> dict:
    """A metrics record written at unix time t."""
    return dict(record(**fields), time=t)


def _members_report(t: float, step: int, tps: tuple[float, float] = (1000.0, 3000.0)) -> list[dict]:
    """One phase-1 report of 2 modules x 2 members: each module's members share its tokens/s."""
    return [
        _at(t, step=step, phase="members", module=i, member=f"m{i}.{j}", tokens_per_s=tps[i], train_loss=2.0)
        for i in range(2) for j in range(2)
    ] + [_at(t, step=step, phase="members", member="uniform", mixed_val_loss=2.5)]


def _merge_report(t: float, step: int, tps: float = 8000.0) -> list[dict]:
    return [
        _at(t, step=step, phase="merge", member="uniform", mixed_val_loss=2.5),
        _at(t, step=step, phase="merge", member="merged", train_loss=1.5, tokens_per_s=tps),
    ]


def _fold(records: list[dict]) -> RunProgress:
    p = RunProgress()
    for r in records:
        p.fold(r)
    return p


def test_members_tokens_per_s_is_the_sum_over_modules_and_the_eta_counts_both_phases():
    # Steps 10 -> 20 in 5 s: 2 steps/s; 80 phase-1 steps and 40 phase-2 steps are left.
    p = _fold(_members_report(100.0, 10) + _members_report(105.0, 20))
    assert p.tokens_per_s == {"members": 4000.0}, "one figure per module, not per member"
    assert p.eta_s(phase1_steps=100, phase2_steps=40) == pytest.approx((80 + 40) / 2.0)
    assert p.current_tokens_per_s == 4000.0


def test_merge_phase_uses_its_own_rate_and_the_merger_tokens_per_s():
    p = _fold(_members_report(100.0, 10) + _members_report(105.0, 20) + _merge_report(200.0, 4) + _merge_report(210.0, 8))
    assert p.tokens_per_s == {"members": 4000.0, "merge": 8000.0}
    assert p.current_tokens_per_s == 8000.0
    # 4 steps in 10 s; 32 merge steps left; phase 1 is over.
    assert p.eta_s(phase1_steps=20, phase2_steps=40) == pytest.approx(32 / 0.4)


def test_eta_is_unknown_until_two_reports_and_zero_when_the_run_is_done():
    p = _fold(_members_report(100.0, 10))
    assert p.eta_s(100, 40) is None
    for r in _members_report(101.0, 20) + [dict(done_record(40), time=300.0)]:
        p.fold(r)
    assert p.eta_s(100, 40) == 0.0


def test_replayed_steps_after_a_restart_give_no_rate_across_the_gap():
    # Steps 10, 20, then the worker group restarts from the step-10 checkpoint 100 s later.
    p = _fold(_members_report(100.0, 10) + _members_report(110.0, 20))
    assert p.steps_per_s["members"] == pytest.approx(1.0)
    for r in _members_report(210.0, 15):
        p.fold(dict(r, replayed=True))
    assert p.steps_per_s["members"] == pytest.approx(1.0), "a replayed step does not count as progress"
    assert p.step["members"] == 15, "the replayed steps are to be run again"
    for r in _members_report(215.0, 25):
        p.fold(r)
    assert p.steps_per_s["members"] == pytest.approx(2.0), "the rate restarts from the first replayed report"


def test_progress_line_shows_steps_tokens_per_s_and_eta():
    p = _fold(_members_report(100.0, 10) + _members_report(105.0, 20))
    line = format_progress(p, phase1_steps=100, phase2_steps=40)
    assert line == "[progress] members 20/100 merge 0/40 | 4.0k tok/s | ETA 1m00s", line
    assert format_progress(RunProgress(), 100, 40) == "[progress] members 0/100 merge 0/40 | ETA -"
    assert [format_duration(s) for s in (12, 245, 3720)] == ["12s", "4m05s", "1h02m"]


def test_progress_bar_shows_tokens_per_s_and_eta(tmp_path, capsys):
    log = MetricsLog(str(tmp_path))
    with ProgressBar(str(tmp_path), phase1_steps=100, phase2_steps=40, interval_s=60):
        log.append(_members_report(100.0, 10) + _members_report(105.0, 20))
    err = capsys.readouterr().err
    assert "tok/s=4.0k" in err and "eta=1m00s" in err, err[-500:]


# ----------------------------------------------------------------------------- the API's job detail


@pytest.fixture
def api(ray_cluster, tmp_path):
    from tests.test_api_support import LiveServer, make_settings

    with LiveServer(make_settings(ray_cluster, tmp_path)) as server, server.client() as c:
        yield c


def test_job_detail_has_tokens_per_s_per_phase_and_eta(api, ray_cluster, tmp_path):
    """A real Ray job carrying a Leviathan job's metadata; its run folder holds a metrics log."""
    from ray.job_submission import JobSubmissionClient

    from api.services.runs import job_metadata
    from tests.scripts.common import tiny_spec
    from tests.test_api_support import wait_for_status

    spec = tiny_spec("builtin", tmp_path, "progress", training={"phase1_steps": 20, "phase2_steps": 40})
    MetricsLog(spec.run_dir).append(
        _members_report(100.0, 10) + _members_report(105.0, 20) + _merge_report(200.0, 4) + _merge_report(210.0, 8)
    )
    job_id = f"leviathan-progress-{uuid.uuid4().hex[:6]}"
    client = JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_cluster.auth_headers())
    client.submit_job(entrypoint="echo trained", submission_id=job_id, metadata=job_metadata(spec, "progress"))
    body = wait_for_status(api, job_id, {"SUCCEEDED"}, timeout=60)
    assert body["tokens_per_s"] == {"members": 4000.0, "merge": 8000.0}, json.dumps(body)[:800]
    assert body["eta_s"] == pytest.approx(32 / 0.4)
    assert body["phase1_steps"] == 20 and body["phase2_steps"] == 40
