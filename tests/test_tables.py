"""The one markdown-table renderer, and the seed summary of reports (benchmarks/merge_seeds.py)."""

import pytest

from leviathan.run.tables import markdown_table


def test_columns_are_padded_to_their_widest_cell():
    assert markdown_table(["model", "loss"], [["m0.0", "1.2345"], ["merged (fusion)", "1.1"]]).splitlines() == [
        "| model           | loss   |",
        "|-----------------|--------|",
        "| m0.0            | 1.2345 |",
        "| merged (fusion) | 1.1    |",
    ]


def test_a_table_without_rows_keeps_its_header():
    assert markdown_table(["#", "trial"], []) == "| # | trial |\n|---|-------|"


def _report(merged_mixed: float, seed: int) -> dict:
    """A report as build_report writes it: 1 member, every baseline, the merged rows."""
    from leviathan.run.names import BASELINES, MERGED, MIXED, NO_STATE
    from leviathan.run.report import build_report

    rows = [MERGED, NO_STATE, "m0.0", *BASELINES]
    losses = {MERGED: merged_mixed, NO_STATE: 2.2, "m0.0": 2.5, "uniform": 2.4, "posterior": 2.3,
              "running posterior": 2.25, "fixed share": 2.1 + 0.01 * seed, "decayed posterior": 2.15}
    nll = {c: [losses[r] * 100 for r in rows] for c in ("d", MIXED)}
    gaps = {MIXED: {"best_baseline": "fixed share", "gap": merged_mixed - losses["fixed share"],
                    "ci95": [-0.05, -0.01 if seed else 0.01], "windows": 4}}
    return build_report(rows=rows, member_modules={"m0.0": 0}, domains=["d"], nll=nll,
                        tokens={"d": 100, MIXED: 100}, nbytes={"d": 100.0, MIXED: 100.0}, settings={}, gaps=gaps)


def test_merge_seeds_summarises_every_gap_over_seeds():
    from benchmarks.merge_seeds import BEST, format_summary, summarise

    reports = [_report(2.05, 0), _report(2.07, 1), _report(2.06, 2)]
    s = summarise(reports)
    best = s["mixed"][BEST]
    assert best["mean"] == pytest.approx(((2.05 - 2.10) + (2.07 - 2.11) + (2.06 - 2.12)) / 3)
    assert best["min"] == pytest.approx(-0.06) and best["max"] == pytest.approx(-0.04)
    assert best["sd"] == pytest.approx(0.01) and best["n"] == 3
    assert best["ci_excludes_zero"] == 2 and best["with_ci"] == 3 and best["best_baselines"] == ["fixed share"]
    assert s["mixed"]["merged (no state)"]["mean"] == pytest.approx(2.06 - 2.2)
    # The column without CIs in the reports: the best baseline comes from the rows.
    assert s["d"][BEST]["best_baselines"] == ["fixed share"] and s["d"][BEST]["with_ci"] == 0
    text = format_summary("demo", s)
    assert "CI excludes 0 in 2/3" in text and "no CI in the reports" in text
