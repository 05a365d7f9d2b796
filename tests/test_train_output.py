"""What `leviathan train` prints: the job's own lines and its final table last; Ray
Train's per-report INFO lines only with `--verbose` (the verbose side is checked on
the `ray job submit` run in test_train_slow.py)."""

from __future__ import annotations

RAY_REPORT_LINES = ("Reporting training result", "Checkpoint successfully created")


def test_ray_train_report_lines_stay_hidden_without_verbose(trained_run):
    output = trained_run.output
    assert f"[leviathan {trained_run.spec.name} rank 0]" in output, "the job's own progress lines show"
    for line in RAY_REPORT_LINES:
        assert line not in output, (line, output[-4000:])
    lines = trained_run.stdout.strip().splitlines()
    assert lines[-1].startswith("run folder:"), lines[-4:]
    assert any(line.startswith("| merged (mixture)") for line in lines), "the final table shows the merged row"
