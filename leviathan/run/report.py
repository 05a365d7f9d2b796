"""The evaluation report: one dict for every evaluation of an ensemble, and its views.

`build_report` makes the dict `report.json` holds, from each row's summed
negative log-likelihood per column and each column's scored token and byte
counts. Both evaluations build it: `leviathan.evaluation.evaluate_ensemble`
(one process, `jobs.evaluate`) and the training workers' closing evaluation
(`cluster.evaluation`), so the figures and the shape are the same.

`final_table` is a view of a report: per row its loss on its own domain, on
the mixed set and on the switch set, and the merged model's verdicts (only
when the report has a merged row: a run without phase 2 has no trained
merger to judge). `format_final_table` and `format_report` are the one
place either is rendered. Torch-free.
"""

from __future__ import annotations

import math
from typing import Any

from leviathan.run.names import (
    BASELINES, MEMBER_KIND, MERGED, METRICS, MIXED, NO_STATE, POSTERIOR, RUNNING_POSTERIOR, SWITCH, SWITCH_PRE, UNIFORM,
    row_kind,
)
from leviathan.run.tables import markdown_table

REPORT_FORMAT_VERSION = 1
LN2 = math.log(2.0)


def _metrics(nll: float, tokens: int, nbytes: float) -> dict[str, float]:
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": nll / nbytes / LN2}


def build_report(
    *,
    rows: list[str],
    member_modules: dict[str, int],
    domains: list[str],
    nll: dict[str, list[float]],
    tokens: dict[str, int],
    nbytes: dict[str, float],
    settings: dict[str, Any],
    weights: dict[str, dict[str, dict[str, float]]] | None = None,
    evidence: dict[str, list[float]] | None = None,
    baselines: dict[str, Any] | None = None,
    gaps: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report dict (the content of report.json).

    rows: row names in table order (`names.row_order`); member_modules: member
    name -> its module, whose domain is `domains[module]`; nll: column -> each
    row's summed NLL over the column's scored tokens; tokens, nbytes: column ->
    scored tokens and their source bytes. Columns are the domains, the mixed set
    and, when `nll` has them, the switch set after and before its cuts. weights: e.g.
    {"merger_weights": {domain: {member: weight}}}, added as they are. baselines:
    the settings fixed share and the decayed posterior were scored with
    (`leviathan.baselines.BaselineSettings`); gaps: per column, merged minus the
    best baseline with its bootstrap CI (`leviathan.evaluation.merged_gaps`).
    """
    columns = [*domains, MIXED] + [c for c in (SWITCH, SWITCH_PRE) if c in nll]
    missing = [c for c in columns if c not in tokens or c not in nbytes]
    if missing:
        raise ValueError(f"build_report: no token or byte count for columns {missing}")
    out_rows = []
    for r, name in enumerate(rows):
        module = member_modules.get(name)
        per_col = {c: _metrics(float(nll[c][r]), tokens[c], nbytes[c]) for c in columns}
        out_rows.append({
            "name": name,
            "kind": row_kind(name),
            "module": module,
            "domain": None if module is None else domains[module],
            **{m: {c: per_col[c][m] for c in columns} for m in METRICS},
        })
    bpt = {d: nbytes[d] / tokens[d] for d in domains}
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "columns": columns,
        "domains": list(domains),
        "rows": out_rows,
        "tokens": dict(tokens),
        "bytes_per_token": {**bpt, MIXED: nbytes[MIXED] / tokens[MIXED]},
        **(weights or {}),
        "evidence": evidence,
        "baselines": baselines,
        "gaps": gaps or {},
        "settings": dict(settings),
    }


def row(report: dict[str, Any], name: str) -> dict[str, Any]:
    """The row called `name` ("merged", "m0.1", "uniform", "posterior") of a report."""
    for r in report["rows"]:
        if r["name"] == name:
            return r
    raise KeyError(f"no row {name!r} in report (rows: {[r['name'] for r in report['rows']]})")


def has_merged(report: dict[str, Any]) -> bool:
    return any(r["name"] == MERGED for r in report["rows"])


def final_table(report: dict[str, Any]) -> dict[str, Any]:
    """The report seen as the training job's final table.

    Per row: own_val_loss (a member's own domain), mixed_val_loss, switch_val_loss
    and val_by_domain, in the report's row order. With a merged row, the verdicts
    `merged_beats_*` on the mixed set (and the switch set); without one, none.
    """
    s = report["settings"]
    rows = []
    for r in report["rows"]:
        loss = r["loss"]
        rows.append({
            "name": r["name"],
            "kind": r["kind"],
            "module": r.get("module"),
            "domain": r["domain"],
            "own_val_loss": loss[r["domain"]] if r["domain"] else None,
            "mixed_val_loss": loss[MIXED],
            "switch_val_loss": loss.get(SWITCH),
            "val_by_domain": {d: loss[d] for d in report["domains"]},
        })
    out: dict[str, Any] = {
        "merge": s.get("merge"),
        "evidence": report.get("evidence"),
        "joint": s.get("joint"),
        "domains": list(report["domains"]),
        "steps": s.get("steps"),
        "rows": rows,
    }
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in (MERGED, NO_STATE, MEMBER_KIND, *BASELINES)}
    if by_kind[MERGED] and by_kind[MEMBER_KIND]:
        merged = by_kind[MERGED][0]
        posteriors = by_kind[POSTERIOR] + by_kind[RUNNING_POSTERIOR]
        mixed = merged["mixed_val_loss"]
        out["merged_beats_every_member"] = all(mixed < m["mixed_val_loss"] for m in by_kind[MEMBER_KIND])
        out["merged_beats_uniform"] = mixed < by_kind[UNIFORM][0]["mixed_val_loss"]
        out["merged_beats_both_posteriors"] = all(mixed < r["mixed_val_loss"] for r in posteriors)
        if merged["switch_val_loss"] is not None:
            out["merged_beats_both_posteriors_on_switch"] = all(
                merged["switch_val_loss"] < r["switch_val_loss"] for r in posteriors
            )
        gaps = report.get("gaps") or {}
        for column, key in ((MIXED, "mixed"), (SWITCH, "switch")):
            if column in gaps:
                out[f"merged_minus_best_baseline_{key}"] = gaps[column]
    return out


def _loss(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def format_final_table(table: dict[str, Any]) -> str:
    """The final table as markdown, then the merged model's verdicts (when it has a merged row)
    and the merger's evidence weights. Losses per scored token, as in report.md."""
    labels = {MERGED: f"{MERGED} ({table['merge']})", POSTERIOR: "posterior (BTM)"}
    body = [
        [labels.get(r["kind"], r["name"]), "" if r["module"] is None else str(r["module"]), r["domain"] or "",
         _loss(r["own_val_loss"]), _loss(r["mixed_val_loss"]), _loss(r["switch_val_loss"])]
        for r in table["rows"]
    ]
    lines = [markdown_table(["model", "module", "domain", "own-domain val", "mixed val", SWITCH], body)]
    if "merged_beats_every_member" in table:
        lines.append(
            f"merged model beats every member on the mixed val set: {table['merged_beats_every_member']}; "
            f"beats the uniform mixture: {table['merged_beats_uniform']}; "
            f"beats both posteriors: {table['merged_beats_both_posteriors']}"
            + (f" (on the switch set: {table['merged_beats_both_posteriors_on_switch']})"
               if "merged_beats_both_posteriors_on_switch" in table else "")
        )
    for key in ("mixed", "switch"):
        gap = table.get(f"merged_minus_best_baseline_{key}")
        if gap:
            lines.append(f"merged minus best baseline ({gap['best_baseline']}) on {key}: {_gap(gap)}")
    if table.get("evidence"):
        ev = table["evidence"]
        lines.append("merger evidence per head: beta " + " ".join(f"{v:.3f}" for v in ev["beta"])
                     + ", gamma " + " ".join(f"{v:.3f}" for v in ev["gamma"]))
    return "\n".join(lines)


def best_baselines(report: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """Per column, the training-free row (`names.BASELINES`) with the lowest loss: (name, loss)."""
    rows = [r for r in report["rows"] if r["kind"] in BASELINES]
    out = {}
    for c in report["columns"]:
        best = min(rows, key=lambda r: r["loss"][c])
        out[c] = (best["name"], best["loss"][c])
    return out


def _gap(gap: dict[str, Any]) -> str:
    low, high = gap["ci95"]
    return f"{gap['gap']:+.4f} (95% CI {low:+.4f} to {high:+.4f}, {gap['windows']} windows)"


def _label(r: dict[str, Any]) -> str:
    if r["kind"] == "twin":
        return f"twin: {MERGED}, {r['mixer']}"
    return f"{r['name']} ({r['domain']})" if r["domain"] else r["name"]


def format_report(report: dict[str, Any], title: str | None = None) -> str:
    """The report as markdown: one table per metric (rows x columns), then the routing weights.

    The best value of every column is marked with `*`.
    """
    cols = report["columns"]
    s = report["settings"]
    out = []
    if title:
        out += [f"# {title}", ""]
    out.append(
        f"{'Dev' if s.get('split') == 'dev' else 'Val'} windows of {s['seq_len']} tokens, the first {s['prefix_tokens']} of each are the "
        f"posterior's dev prefix and are not scored (every row is scored on the same "
        f"{s['scored_tokens_per_window']} tokens per window); every domain is scored on "
        f"{s['windows_per_domain']} windows and the mixed set is all of them."
    )
    if s.get("switch_windows"):
        out[-1] += (
            f" The switch set is {s['switch_windows']} windows that start in one domain and change to "
            "another at a cut drawn in [T/4, 3T/4] (every ordered pair, fixed seed), scored on the same "
            f"positions: `{SWITCH}` is the loss after the cut, `{SWITCH_PRE}` before it."
        )
    if report.get("baselines"):
        b = report["baselines"]
        out.append(
            f"\nFixed share alpha = {b['alpha']:g}; decayed posterior beta = {b['beta']:g}, gamma = {b['gamma']:g} "
            + ("(tuned on train-split windows)." if b.get("tuned") else "(defaults, not tuned).")
        )
    if report.get("evidence"):
        ev = report["evidence"]
        out.append(
            "\nMerger evidence per head: beta "
            + ", ".join(f"{v:.3f}" for v in ev["beta"])
            + "; gamma "
            + ", ".join(f"{v:.3f}" for v in ev["gamma"])
            + "."
        )
    for metric, heading, digits in (
        ("loss", "Loss (nats per token)", 4),
        ("bpb", "Bits per byte", 4),
        ("ppl", "Perplexity", 2),
    ):
        best = {c: min(r[metric][c] for r in report["rows"]) for c in cols}
        body = [
            [_label(r)]
            + [f"{r[metric][c]:.{digits}f}" + ("*" if r[metric][c] == best[c] else "") for c in cols]
            for r in report["rows"]
        ]
        out += ["", f"## {heading}", "", markdown_table(["model", *cols], body)]
        if metric == "loss":
            out += ["", "Best baseline (the best training-free row) per column: " + "; ".join(
                f"{c}: {name} ({value:.4f})" for c, (name, value) in best_baselines(report).items()) + "."]
    if report.get("gaps"):
        body = [[c, g["best_baseline"], f"{g['gap']:+.4f}", f"{g['ci95'][0]:+.4f} to {g['ci95'][1]:+.4f}",
                 str(g["windows"])] for c, g in report["gaps"].items()]
        out += ["", "## Merged minus best baseline (nats per token, paired bootstrap over windows)", "",
                markdown_table(["column", "best baseline", "gap", "95% CI", "windows"], body)]
    for key, heading in (
        ("merger_weights", "Merger weight per member (mean over tokens and heads)"),
        ("posterior_weights", "Posterior weight per member (mean over windows)"),
        ("running_posterior_weights", "Running posterior weight per member (mean over tokens)"),
    ):
        if not report.get(key):
            continue
        members = list(next(iter(report[key].values())))
        body = [[d] + [f"{report[key][d][m]:.3f}" for m in members] for d in report["domains"]]
        out += ["", f"## {heading}", "", markdown_table(["domain", *members], body)]
    return "\n".join(out) + "\n"
