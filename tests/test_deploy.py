"""`leviathan deploy`: the KubeRay RayJob and the `ray up` config a spec becomes,
checked against KubeRay's documented fields and Ray's own cluster-config schema,
and the RayJob's entrypoint and runtime env run as a job on the local Ray."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs import deploy
from jobs.spec import JobSpec, load_spec
from tests.conftest import REPO_ROOT
from tests.scripts.common import MERGED, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "cluster" / "deploy"
GIANT = EXAMPLES / "giant.toml"
RAYJOB_SCHEMA = Path(__file__).parent / "schemas" / "kuberay-rayjob.schema.json"


def ray_cluster_schema() -> dict:
    """Ray's `ray up` config schema, shipped in the ray wheel."""
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


def read_documents(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def test_ray_up_config_matches_rays_cluster_schema(tmp_path):
    spec = load_spec(GIANT)
    config, spec_file = deploy.write(spec, "ray-up", tmp_path)
    (document,) = read_documents(config)
    jsonschema.validate(document, ray_cluster_schema())

    nodes = document["available_node_types"]
    assert document["head_node_type"] in nodes
    worker = nodes["worker"]
    assert worker["resources"] == {"CPU": 4, "GPU": 1}
    assert worker["min_workers"] == worker["max_workers"] == spec.num_workers == 4
    assert nodes["head"]["resources"] == {"CPU": 0}, "no Train worker lands on the head"
    mounts = document["file_mounts"]
    assert any("pip install" in c and deploy.SOURCE_MOUNT in c for c in document["setup_commands"])
    assert mounts[deploy.SOURCE_MOUNT] == "."
    assert JobSpec.model_validate_json(Path(mounts[deploy.SPEC_MOUNT]).read_text()) == spec
    assert Path(mounts[deploy.SPEC_MOUNT]) == spec_file
    assert "docker" not in document
    with_image = deploy.ray_up(spec, "spec.json", image="example/leviathan:1")
    jsonschema.validate(with_image, ray_cluster_schema())
    assert with_image["docker"]["image"] == "example/leviathan:1"


def test_rayjob_matches_kuberays_fields_and_carries_the_spec(tmp_path):
    spec = load_spec(GIANT)
    (path,) = deploy.write(spec, "kuberay", tmp_path, image="example/leviathan:1")
    config_map, job = read_documents(path)
    schema = json.loads(RAYJOB_SCHEMA.read_text())
    jsonschema.validate(job, schema)

    cluster = job["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "example/leviathan:1"
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"env_vars": {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}}

    # The entrypoint reads the spec where the head pod mounts the ConfigMap.
    assert job["spec"]["entrypoint"].startswith("python -m jobs.train --spec /etc/leviathan/spec.json")
    head = cluster["headGroupSpec"]["template"]["spec"]
    (mount,) = head["containers"][0]["volumeMounts"]
    (volume,) = head["volumes"]
    assert mount["mountPath"] == "/etc/leviathan" and volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert JobSpec.model_validate_json(config_map["data"]["spec.json"]) == spec

    cpu_only = spec.model_copy(update={"resources": spec.resources.model_copy(update={"use_gpu": False})})
    (_, cpu_job) = deploy.rayjob(cpu_only)
    jsonschema.validate(cpu_job, schema)
    limits = cpu_job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits


def test_the_schemas_reject_what_they_should(tmp_path):
    """The schemas can fail: a RayJob without its cluster, a node type without resources."""
    spec = load_spec(GIANT)
    _, job = deploy.rayjob(spec)
    del job["spec"]["rayClusterSpec"]["headGroupSpec"]
    with pytest.raises(jsonschema.ValidationError, match="headGroupSpec"):
        jsonschema.validate(job, json.loads(RAYJOB_SCHEMA.read_text()))
    config = deploy.ray_up(spec, "spec.json")
    config["available_node_types"]["worker"]["resources"]["CPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_cluster_schema())


@pytest.mark.parametrize("target", deploy.TARGETS)
def test_local_storage_is_refused_for_a_multi_node_target(tmp_path, capsys, target):
    spec = load_spec(GIANT).model_copy(update={"storage": str(tmp_path / "runs")})
    spec_file = tmp_path / "local.json"
    spec_file.write_text(spec.to_json())
    code = deploy.main(["--spec", str(spec_file), "--target", target, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "storage:" in err and "local path" in err and target in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert deploy.main(["--spec", str(GIANT), "--target", "slurm"]) == 2
    assert "--target" in capsys.readouterr().err
    assert deploy.main(["--spec", str(tmp_path / "missing.toml"), "--target", "kuberay"]) == 2
    err = capsys.readouterr().err.strip()
    assert "spec file not found" in err and len(err.splitlines()) == 1


def test_cli_dispatches_deploy(tmp_path, capsys):
    from cli.main import main

    assert main(["deploy", "--spec", str(GIANT), "--target", "kuberay", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "giant.rayjob.yaml")


def test_examples_in_cluster_deploy_are_up_to_date(tmp_path, monkeypatch):
    """cluster/deploy/ holds what the generator writes for giant.toml, run from the repository root."""
    monkeypatch.chdir(tmp_path)
    spec = load_spec(GIANT)
    out = Path("cluster/deploy")
    for path in deploy.write(spec, "kuberay", out) + deploy.write(spec, "ray-up", out):
        committed = ROOT / path
        assert committed.is_file() and committed.read_text() == path.read_text(), (
            f"{committed} is stale: regenerate with `leviathan deploy --spec cluster/deploy/giant.toml "
            f"--target kuberay|ray-up --out cluster/deploy`"
        )


def test_ray_job_submit_runs_the_rayjob_entrypoint_and_runtime_env(ray_cluster, builtin_corpus, tmp_path):
    """What KubeRay's submitter does, and what `leviathan deploy --target ray-up` tells a user
    to type: `ray job submit` with the RayJob's runtime env and entrypoint (the spec where the
    ConfigMap is mounted), the code uploaded as its working dir. `--verbose` on the entrypoint
    brings back Ray Train's per-report lines (test_train_output.py checks they stay hidden without it)."""
    from tests.test_train_output import RAY_REPORT_LINES

    shared = tmp_path / "shared"
    spec = tiny_spec(builtin_corpus, f"file://{shared}", "kuberay-tiny")
    mount = tmp_path / "etc-leviathan"
    config_map, job = deploy.rayjob(spec, spec_dir=str(mount))
    mount.mkdir()
    for name, text in config_map["data"].items():
        (mount / name).write_text(text)

    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
         "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
         "--", *shlex.split(job["spec"]["entrypoint"]), "--verbose"],
        cwd=REPO_ROOT, env=ray_cluster.cli_env(), capture_output=True, text=True, timeout=400,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "succeeded" in output and "merged (mixture)" in output, "the job printed its final table"
    for line in RAY_REPORT_LINES:
        assert line in output, (line, output[-4000:])
    result = json.loads((shared / "kuberay-tiny" / "train_result.json").read_text())
    kinds = [r["kind"] for r in result["rows"]]
    assert kinds[0] == MERGED and kinds[-5:] == ["uniform", "posterior", "running posterior", "fixed share",
                                                 "decayed posterior"], kinds
    assert (shared / "kuberay-tiny" / "final" / "model.safetensors").is_file()
