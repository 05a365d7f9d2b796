"""Leviathan's `ray.util.metrics` gauges on the node's Prometheus export, and the
Grafana dashboard in cluster/dashboards that charts them."""

from __future__ import annotations

import json
import re
from pathlib import Path


from cluster.metrics import GAUGES, PHASE_GAUGE

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "dashboards" / "leviathan_grafana.json"
EXPORTED = {f"ray_leviathan_{name}" for name in [*GAUGES, PHASE_GAUGE]}


def test_grafana_panels_query_the_gauges_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_leviathan_[a-z_]+", target["expr"]))
            assert names, f"panel {panel['title']!r} queries no Leviathan gauge: {target['expr']}"
            assert names <= EXPORTED, f"panel {panel['title']!r} queries unknown gauges {names - EXPORTED}"
            queried |= names
    assert queried == EXPORTED, f"gauges without a panel: {EXPORTED - queried}"


def test_gauges_reach_the_prometheus_export_port(trained_run):
    """Loss per member, merged loss, tokens/s, phase and step, tagged with the run, appear on
    the head node's metrics port while and after the session's trained run trains (the
    run's fixture scrapes them)."""
    from tests.scripts.common import MERGED

    wanted = {
        "member train loss": lambda n, t: n == "ray_leviathan_train_loss" and t.get("member") == "m0.0",
        "member val loss": lambda n, t: n == "ray_leviathan_val_loss" and t.get("member") == "m1.1",
        "merged loss": lambda n, t: n == "ray_leviathan_mixed_val_loss" and t.get("member") == MERGED,
        "tokens/s": lambda n, t: n == "ray_leviathan_tokens_per_s" and t.get("phase") == "members",
        "step": lambda n, t: n == "ray_leviathan_step" and t.get("phase") == "merge",
        "phase": lambda n, t: n == "ray_leviathan_phase",
    }
    seen: dict[str, float] = {}
    for (name, tags), value in trained_run.gauges.items():
        for what, matches in wanted.items():
            if matches(name, dict(tags)):
                seen[what] = max(value, seen.get(what, value))
    assert set(seen) == set(wanted), f"missing: {sorted(set(wanted) - set(seen))}"
    assert seen["tokens/s"] > 0 and seen["member train loss"] > 0
    assert seen["phase"] >= 2, "the merge phase was reported"
