"""A node dies mid-run and a replacement joins: the job resumes and finishes.

Run as a subprocess by tests/test_train_slow.py (a `ray.cluster_utils.Cluster`
cannot share a process with another Ray session). The head has no CPUs, so the
two 1-CPU workers land one on each worker node; once a checkpoint is
registered, one worker node is removed without grace (a crash), and a new one
is added. Prints one JSON line: what was removed and the finished run's steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--manifest", required=True)
    p.add_argument("--storage", required=True)
    args = p.parse_args()

    import ray
    import torch
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from cluster.checkpointing import module_file
    from jobs import train
    from tests.scripts.common import MERGED, tiny_spec

    P1 = 120
    spec = tiny_spec(
        Path(args.manifest), Path(args.storage), "node-failure",
        training={"phase1_steps": P1, "phase2_steps": 4, "batch_size": 8, "seq_len": 64,
                  "eval_interval": 10, "checkpoint_interval": 20},
        resources={"max_failures": 3},
    )
    run = Path(spec.run_dir)
    # Every process of this cluster (its nodes inherit this environment) asks
    # its own dashboard, not whichever Ray started last on the machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    os.environ["RAY_API_SERVER_ADDRESS"] = dashboard
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard_port},
    )
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        out: dict = {}

        def fit() -> None:
            try:
                out["result"] = train.run(spec, progress=False)
            except BaseException as e:  # reported below
                out["error"] = repr(e)

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        snapshot = run / "checkpoints" / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 240
        while not snapshot.is_file():
            if time.monotonic() > deadline or not thread.is_alive():
                raise SystemExit(f"no checkpoint registered: {out}")
            time.sleep(0.1)

        victim = nodes[1]
        workers = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        hosted = any(w.node_id == victim.node_id for w in workers)
        cluster.remove_node(victim, allow_graceful=False)  # add_node/remove_node: main thread only
        cluster.add_node(num_cpus=1)
        thread.join(timeout=300)
        if "result" not in out:
            raise SystemExit(f"run did not finish: {out.get('error', 'timed out')}")
        result = out["result"]
        ckpt = Path(result["checkpoint"])
        steps = [torch.load(ckpt / module_file(i), weights_only=False)["sampler"]["batches_drawn"] for i in range(2)]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        merged = next(r["mixed_val_loss"] for r in result["rows"] if r["kind"] == MERGED)
        print(json.dumps({
            "removed_node_hosted_worker": hosted,
            "phase1_steps": P1,
            "module_steps": steps,
            "replayed_lines": sum(1 for r in records if r.get("replayed")),
            "merged_mixed_val_loss": merged,
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
