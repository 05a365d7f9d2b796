"""benchmarks/gpu_check.py on a machine like the GPU machine: torch, Triton, numpy and pyarrow only.

The check runs in a subprocess whose imports of Ray, pydantic, FastAPI, uvicorn and
safetensors fail (a sys.meta_path blocker), in --cpu mode (tiny sizes, Triton's interpreter).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = [
    "versions", "params", "matmul_peak", "kernel_accuracy", "kernel_repeatability", "member_step_triton",
    "member_step_lag_stacked", "prefill_decode", "merge_step", "checkpoint", "collectives", "kernel_timing",
    "kernel_resources", "kernel_sweep",
]
BLOCKED = ("ray", "pydantic", "fastapi", "uvicorn", "starlette", "safetensors")
# Runs gpu_check.py as __main__ with the packages the GPU machine lacks made unimportable.
WRAPPER = f"""
import runpy, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"{{name}} is not on the GPU machine", name=name)
for name in list(sys.modules):
    if name.split(".")[0] in {BLOCKED!r}:
        del sys.modules[name]
sys.meta_path.insert(0, Blocker())
sys.argv = ["gpu_check.py", *sys.argv[1:]]
runpy.run_path({str(REPO / "benchmarks" / "gpu_check.py")!r}, run_name="__main__")
"""


def run_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, "--cpu", "--out", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")


@pytest.mark.slow
def test_cpu_mode_runs_every_section_without_ray_pydantic_or_fastapi(tmp_path):
    proc = run_check(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert json.loads(proc.stdout) == summary
    assert list(summary["statuses"]) == SECTIONS
    for name in SECTIONS:  # written as it went, one JSON and one log line per section
        section = json.loads((tmp_path / f"{name}.json").read_text())
        assert section == summary["sections"][name]
        assert section["wall_s"] >= 0 and "triton_compile_s" in section
    assert len((tmp_path / "check.log").read_text().splitlines()) == len(SECTIONS)

    expected = {name: "ok" for name in SECTIONS}
    expected["kernel_resources"] = summary["statuses"]["kernel_resources"]
    expected["collectives"] = "world size 1, no traffic"
    assert summary["statuses"] == expected, {n: summary["sections"][n].get("error") for n in SECTIONS}
    assert expected["kernel_resources"].startswith("not checked: ")
    assert summary["failed"] == [] and proc.returncode == 0
    sections = summary["sections"]
    assert sections["collectives"]["ok"] is False, "identities at world size 1 are not a pass"
    assert "two or more GPUs" in summary["scope"]

    assert sections["params"]["ensemble"] > 1_000_000_000, "the giant spec's ~1.2B parameters, counted on meta"
    rows = sections["kernel_accuracy"]["rows"]
    assert {r["T"] % 64 for r in rows} == {0, 70 % 64} and all(r["within"] for r in rows)
    assert sections["kernel_repeatability"]["bitwise_equal"]["out"] is True
    assert sections["member_step_triton"]["path_taken"] == ["triton (T=32, cpu)"]
    assert sections["member_step_lag_stacked"]["path_taken"] == ["lag_stacked (T=32, cpu)"]
    timing = sections["kernel_timing"]["rows"][0]
    assert {"triton", "flash_w1", "lag_stacked"} <= set(timing) and timing["triton"]["fwd_tflops"] > 0
    sweep = sections["kernel_sweep"]
    assert len(sweep["rows"]) >= 5 and all(r["accurate"] for r in sweep["rows"])
    assert sweep["fastest"] is None and sweep["decision"].startswith("keep ")
    assert sections["checkpoint"]["tensors_compared"] > 0 and sections["checkpoint"]["optimizer_state"] is True


def test_deadline_skips_what_is_left_and_says_so(tmp_path):
    proc = run_check(tmp_path, "--deadline-s", "1e-9")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary["statuses"] == {name: "skipped: deadline" for name in SECTIONS}
    assert all(not s["ok"] and "elapsed" in s["why"] for s in summary["sections"].values())
    assert "skipped: deadline" in (tmp_path / "check.log").read_text()


def test_a_bad_deadline_is_a_one_line_error(tmp_path):
    proc = run_check(tmp_path, "--deadline-s", "0")
    assert proc.returncode == 2 and "--deadline-s: must be > 0" in proc.stderr


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


def test_memory_estimate_counts_what_each_path_saves(monkeypatch):
    """The Triton op saves q, k, v, out and lse at width d; lag stacking saves d*w-wide tensors."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.memory_estimate import member_activations
    from leviathan.config import ComponentConfig
    from leviathan.kernels import shifted_diagonal as kernel

    launch = kernel.forward
    config = ComponentConfig.preset("tiny", vocab_size=256, window=4)
    saved = {path: [r["saved"] for r in member_activations(config, 256, path)["points"]]
             for path in ("triton", "lag_stacked")}
    assert all(t < s for t, s in zip(saved["triton"], saved["lag_stacked"])), saved
    assert kernel.forward is launch and "TRITON_INTERPRET" not in os.environ
