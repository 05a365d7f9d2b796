"""benchmarks/gpu_check.py's --cpu smoke mode: every section's code path runs at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {
    "versions", "params", "sdpa_backends", "prefill_decode", "member_gelu4", "member_relu3", "mfu",
    "merge_step", "checkpoint", "collectives", "kernel",
}


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_section(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    assert {k for k, v in report.items() if isinstance(v, dict)} == SECTIONS
    # flops() and the mixer-path rule come with the kernel work; without them only MFU cannot run.
    allowed = set() if (REPO / "leviathan" / "flops.py").is_file() else {"mfu"}
    assert set(report["failed"]) <= allowed, {k: report[k] for k in report["failed"]}
    assert proc.returncode == (0 if not report["failed"] else 1)

    assert report["params"]["ensemble"] > 1_000_000_000, "the giant spec's ~1.2B parameters, counted on meta"
    backends = {r["backend"] for r in report["sdpa_backends"]["rows"]}
    assert backends == {"flash_attention", "efficient_attention", "cudnn_attention", "math"}
    assert "math" in report["sdpa_backends"]["usable_for_every_case"]
    assert {r["case"] for r in report["sdpa_backends"]["rows"]} == {"causal", "masked_prefill", "decode"}
    for name in ("prefill", "masked_prefill", "decode"):
        assert report["prefill_decode"][f"{name}_rel_error"] <= 5e-2
    for flavour in ("gelu4", "relu3"):
        member = report[f"member_{flavour}"]
        assert member["tokens_per_s"] > 0 and member["loss"] > 0
    assert report["collectives"]["differentiable_all_gather_backward"] is True
    assert "needs 2 GPUs" in report["collectives"]["multi_rank"] and "needs 2 GPUs" in report["note"]
    assert report["checkpoint"] == {**report["checkpoint"], "weights": True, "optimizer_state": True, "rng": True}


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name,model,peak",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.0),
        ("NVIDIA H200", "H200 SXM", 989.0),
        ("NVIDIA H200 NVL", "H200 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", None, None),
    ],
)
def test_peak_is_the_exact_device_models(name, model, peak):
    assert _gpu_check_module().peak_for(name) == (model, peak)
