"""Cluster files for a JobSpec: a KubeRay RayJob, or a `ray up` cluster config.

    python -m jobs.deploy --spec S --target kuberay|ray-up [--image IMG] [--out DIR]

`kuberay` writes `<name>.rayjob.yaml`: a ConfigMap holding the validated spec
and a `RayJob` (apiVersion ray.io/v1) whose embedded `rayClusterSpec` has a
head group (no training resources; it runs the driver, which reads the spec
from the ConfigMap) and one worker group of `resources.workers` pods, one Ray
Train worker per pod with its own GPU. KubeRay's submitter runs the
entrypoint `python -m jobs.train --spec ...` with `runtimeEnvYAML`'s
environment and deletes the cluster once the job ends.

`ray-up` writes `<name>.ray-up.yaml` (Ray's cluster launcher, AWS by default)
and `<name>.spec.json` beside it: the same head and worker node types, the
package and the spec copied onto every node by `file_mounts`, the package
installed by `setup_commands`.

Every node of such a cluster reads and writes the run folder, so the spec's
`storage` must be a URI all nodes reach (`s3://`, `gs://`, or `file:///...` on
a filesystem mounted at the same path everywhere); a plain local path is an
error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from cluster.session import STATE_TRACKING
from jobs.entry import add_spec_overrides, load_spec_with_overrides
from jobs.spec import JobSpec, SpecError
from leviathan.run.folder import SPEC_FILE

TARGETS = ("kuberay", "ray-up")
DEFAULT_IMAGE = "leviathan:latest"  # cluster/deploy/Dockerfile: Ray's image with this package installed
SPEC_DIR = "/etc/leviathan"  # where the head pod mounts the spec's ConfigMap
JOB_ENV = {STATE_TRACKING: "1"}  # the dashboard's Train view (Ray Train V2 state tracking)
TTL_AFTER_FINISHED_S = 600  # keeps the finished cluster's logs readable for ten minutes
METRICS_PORT = 8080  # every node's Prometheus export port (ray start --metrics-export-port)
HEAD_CPUS, HEAD_MEMORY = 4, "16Gi"
WORKER_MEMORY = "64Gi"
# ray up node types on AWS; edit the written file for another cloud or size.
HEAD_INSTANCE = "m5.2xlarge"
GPU_WORKER_INSTANCE = "g5.4xlarge"  # 1 A10G, 16 vCPU, 64 GiB
CPU_WORKER_INSTANCE = "m5.4xlarge"
SOURCE_MOUNT = "~/leviathan-src"
SPEC_MOUNT = "~/leviathan-spec.json"


def check_shared_storage(spec: JobSpec, target: str) -> None:
    """A multi-node run needs a run folder every node reaches: refuse a local path."""
    if "://" not in spec.storage:
        raise SpecError(
            f"storage: {spec.storage!r} is a local path, but a {target} cluster has several nodes; "
            "use shared storage every node reaches (s3://..., gs://..., or file:///... on a shared mount)"
        )


def _spec_json(spec: JobSpec) -> str:
    """The spec as the user wrote it (fields left out keep their defaults on the cluster too)."""
    return spec.model_dump_json(indent=2, exclude_unset=True) + "\n"


def _resource_name(spec: JobSpec) -> str:
    """A Kubernetes object name (DNS label) for the run: `leviathan-<name>`."""
    return f"leviathan-{spec.name.replace('_', '-')}"


def _worker_cpus(spec: JobSpec) -> int:
    return math.ceil(spec.resources.cpus_per_worker)


def _worker_gpus(spec: JobSpec) -> int:
    return math.ceil(spec.resources.gpus_per_worker) if spec.resources.use_gpu else 0


def entrypoint(spec_path: str) -> str:
    """The driver command every target runs (`ray job submit -- <this>`)."""
    return f"python -m jobs.train --spec {spec_path} --no-progress"


def runtime_env() -> dict[str, Any]:
    return {"env_vars": dict(JOB_ENV)}


def rayjob(spec: JobSpec, image: str = DEFAULT_IMAGE, spec_dir: str = SPEC_DIR) -> list[dict[str, Any]]:
    """[ConfigMap with the spec, RayJob] for KubeRay; the head pod mounts the ConfigMap at spec_dir."""
    check_shared_storage(spec, "kuberay")
    name = _resource_name(spec)
    labels = {"app.kubernetes.io/name": "leviathan", "leviathan/run": spec.name}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-spec", "labels": labels},
        "data": {SPEC_FILE: _spec_json(spec)},
    }
    head_resources = {"cpu": str(HEAD_CPUS), "memory": HEAD_MEMORY}
    worker_resources = {"cpu": str(_worker_cpus(spec)), "memory": WORKER_MEMORY}
    if _worker_gpus(spec):
        worker_resources["nvidia.com/gpu"] = str(_worker_gpus(spec))
    workers = spec.num_workers
    head = {
        # num-cpus 0: no Train worker lands on the head, which only runs the driver.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "metrics-export-port": str(METRICS_PORT)},
        "template": {"spec": {
            "containers": [{
                "name": "ray-head",
                "image": image,
                "ports": [
                    {"name": "gcs", "containerPort": 6379},
                    {"name": "dashboard", "containerPort": 8265},
                    {"name": "client", "containerPort": 10001},
                    {"name": "metrics", "containerPort": METRICS_PORT},
                ],
                "resources": {"requests": head_resources, "limits": head_resources},
                "volumeMounts": [{"name": "spec", "mountPath": spec_dir, "readOnly": True}],
            }],
            "volumes": [{"name": "spec", "configMap": {"name": f"{name}-spec"}}],
        }},
    }
    worker_group = {
        "groupName": "gpu-workers" if _worker_gpus(spec) else "cpu-workers",
        "replicas": workers,
        "minReplicas": workers,
        "maxReplicas": workers,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
        "template": {"spec": {"containers": [{
            "name": "ray-worker",
            "image": image,
            "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
            "resources": {"requests": worker_resources, "limits": worker_resources},
        }]}},
    }
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "entrypoint": entrypoint(f"{spec_dir}/{SPEC_FILE}"),
            "runtimeEnvYAML": yaml.safe_dump(runtime_env()),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "rayClusterSpec": {
                "rayVersion": version("ray"),
                "headGroupSpec": head,
                "workerGroupSpecs": [worker_group],
            },
        },
    }
    return [config_map, job]


def ray_up(spec: JobSpec, spec_file: str, image: str | None = None, source: str = ".") -> dict[str, Any]:
    """A `ray up` cluster config; spec_file and source are local paths, relative to where `ray up` runs."""
    check_shared_storage(spec, "ray-up")
    workers = spec.num_workers
    worker_resources = {"CPU": _worker_cpus(spec)}
    if _worker_gpus(spec):
        worker_resources["GPU"] = _worker_gpus(spec)
    config: dict[str, Any] = {
        "cluster_name": _resource_name(spec),
        "max_workers": workers,
        "idle_timeout_minutes": 10,
        "provider": {"type": "aws", "region": "us-west-2", "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "head",
        "available_node_types": {
            # CPU 0: the head runs the driver only; every Train worker gets a worker node.
            "head": {"node_config": {"InstanceType": HEAD_INSTANCE}, "resources": {"CPU": 0},
                     "min_workers": 0, "max_workers": 0},
            "worker": {
                "node_config": {"InstanceType": GPU_WORKER_INSTANCE if _worker_gpus(spec) else CPU_WORKER_INSTANCE},
                "resources": worker_resources,
                "min_workers": workers,
                "max_workers": workers,
            },
        },
        "file_mounts": {SOURCE_MOUNT: source, SPEC_MOUNT: spec_file},
        "rsync_exclude": [".git", ".venv", "**/__pycache__"],
        "setup_commands": [f"pip install {SOURCE_MOUNT}"],
        "head_start_ray_commands": [
            "ray stop",
            f"{STATE_TRACKING}=1 ray start --head --port=6379 --dashboard-host=0.0.0.0 "
            f"--metrics-export-port={METRICS_PORT} --autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"ray start --address=$RAY_HEAD_IP:6379 --metrics-export-port={METRICS_PORT}",
        ],
    }
    if image:
        config["docker"] = {"image": image, "container_name": "leviathan", "pull_before_run": True}
    return config


class _Dumper(yaml.SafeDumper):
    """Readable YAML for people to review: multi-line strings (the spec, the runtime env)
    as `|` blocks, and no anchors where two pods share a resources dict."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def _dump(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False)


def _header(lines: list[str]) -> str:
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


def write(spec: JobSpec, target: str, out: str | os.PathLike, image: str | None = None) -> list[Path]:
    """Write the target's files into `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if target == "kuberay":
        path = out / f"{spec.name}.rayjob.yaml"
        header = _header([
            f"Leviathan run {spec.name!r} as a KubeRay RayJob (generated by `leviathan deploy`; edit the spec, not this file).",
            f"kubectl apply -f {path}",
        ])
        path.write_text(header + _dump(rayjob(spec, image or DEFAULT_IMAGE)))
        return [path]
    if target == "ray-up":
        spec_path = out / f"{spec.name}.spec.json"
        path = out / f"{spec.name}.ray-up.yaml"
        config = ray_up(spec, str(spec_path), image)
        spec_path.write_text(_spec_json(spec))
        env = json.dumps(runtime_env(), separators=(",", ":"))
        header = _header([
            f"Leviathan run {spec.name!r} on a `ray up` cluster (generated by `leviathan deploy`; edit the spec, not this file).",
            "From the repository root:",
            f"  ray up {path}",
            f"  ray job submit --address http://<head>:8265 --runtime-env-json '{env}' -- {entrypoint(SPEC_MOUNT)}",
        ])
        path.write_text(header + _dump([config]))
        return [path, spec_path]
    raise SpecError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise SpecError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="leviathan deploy", description="Write KubeRay or `ray up` files that run a spec on a cluster.")
    p.add_argument("--spec", required=True, help="JobSpec file (.toml or .json); its storage must be shared")
    p.add_argument("--target", required=True, choices=TARGETS)
    p.add_argument("--image", default=None,
                   help=f"container image with this package installed (kuberay default {DEFAULT_IMAGE}; "
                        "ray-up: none, the package is installed on the hosts)")
    p.add_argument("--out", default=".", help="output folder (default: the current folder)")
    add_spec_overrides(p)  # like `leviathan train`: they replace a spec file's placeholders
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        spec = load_spec_with_overrides(args.spec, args.storage, args.manifest)
        paths = write(spec, args.target, args.out, args.image)
    except SpecError as e:
        print(f"leviathan deploy: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"leviathan deploy: error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
