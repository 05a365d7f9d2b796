"""Leviathan's `ray.util.metrics` gauges on the node's Prometheus export, and the
Grafana dashboard in cluster/dashboards that charts them."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest

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


def _samples(metrics_url: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


@pytest.mark.slow
def test_gauges_reach_the_prometheus_export_port(ray_cluster, tmp_path, tmp_path_factory):
    """Loss per member, merged loss, tokens/s, phase and step, tagged with the run,
    appear on the head node's metrics port while and after a tiny run trains."""
    from jobs import train
    from tests.scripts.common import builtin_manifest, tiny_spec

    manifest = builtin_manifest(tmp_path_factory.getbasetemp() / "leviathan-builtin")
    spec = tiny_spec(manifest, tmp_path, "gauges")
    wanted = {
        "member train loss": lambda n, t: n == "ray_leviathan_train_loss" and t.get("member") == "m0.0",
        "member val loss": lambda n, t: n == "ray_leviathan_val_loss" and t.get("member") == "m1.1",
        "merged loss": lambda n, t: n == "ray_leviathan_mixed_val_loss" and t.get("member") == "merged",
        "tokens/s": lambda n, t: n == "ray_leviathan_tokens_per_s" and t.get("phase") == "members",
        "step": lambda n, t: n == "ray_leviathan_step" and t.get("phase") == "merge",
        "phase": lambda n, t: n == "ray_leviathan_phase",
    }
    seen: dict[str, float] = {}

    def scrape() -> None:
        for name, tags, value in _samples(ray_cluster.metrics_url):
            if tags.get("run") != spec.name:
                continue
            for what, matches in wanted.items():
                if matches(name, tags):
                    seen[what] = max(value, seen.get(what, value))

    run = threading.Thread(target=train.run, args=(spec,), kwargs={"progress": False}, daemon=True)
    run.start()
    # Ray exports a worker's gauges a few seconds after they are set: scrape during
    # the run and after it, until every gauge has shown up or the deadline passes.
    deadline = time.monotonic() + 240
    while set(seen) != set(wanted) and time.monotonic() < deadline:
        scrape()
        time.sleep(0.5)
    run.join(timeout=max(1.0, deadline - time.monotonic()))
    assert set(seen) == set(wanted), f"missing from {ray_cluster.metrics_url}: {sorted(set(wanted) - set(seen))}"
    assert seen["tokens/s"] > 0 and seen["member train loss"] > 0
    assert seen["phase"] >= 2, "the merge phase was reported"
