"""The README's "Training on a Ray cluster" commands, run as written.

The commands are parsed out of README.md, so the document cannot drift from what
works. They run against the test session's own cluster (never a second Ray on the
default ports) in a shell that looks like a fresh machine's after `ray start
--head`: no Ray variables set, HOME a temporary folder holding only the cluster's
`~/.ray/auth_token`. What the test changes, and only this:
- `source .venv/bin/activate`: this interpreter's folder leads PATH instead;
- `ray start --head`: the session's cluster stands in for it;
- `http://127.0.0.1:8265` becomes that cluster's Jobs server address.
The REST API, with its storage root at `~/leviathan/runs` of that HOME, must show
the job with its members, and its log the workers' first line (their collective
check passed, so the demo's ensemble was built on every rank); the API then stops it.
A job's progress through the API is `tests/test_api.py`'s (a `ray job submit` job and
an API job, to their end).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, VENV_BIN
from tests.test_api_support import LiveServer, make_settings

README = REPO_ROOT / "README.md"
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
SETUP = {"source .venv/bin/activate", "ray start --head"}


def cluster_commands() -> list[str]:
    """The shell commands of the README's cluster section: continuations joined, comments dropped."""
    section = README.read_text().split("## Training on a Ray cluster", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in lines if line.strip()]


def test_readme_cluster_commands_are_parsed():
    commands = cluster_commands()
    assert SETUP <= set(commands), commands
    submit = next(c for c in commands if c.startswith("ray job submit"))
    assert "--metadata-json" in submit and "RAY_AUTH_MODE=token" in " ".join(commands)
    assert "--name cluster-demo" in submit  # not the quick start's run name, "demo"
    assert DEFAULT_DASHBOARD in " ".join(commands)


def _fresh_shell_env(home: Path, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "LEVIATHAN_")) and k not in ("PYTHONPATH",)}
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token)
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _run(command: str, env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", command], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_cluster_commands_run_as_written(ray_cluster, tmp_path):
    home = tmp_path / "home"
    env = _fresh_shell_env(home, ray_cluster.auth_token or "")
    commands = [c.replace(DEFAULT_DASHBOARD, ray_cluster.dashboard_url)
                for c in cluster_commands() if c not in SETUP]
    exports = [c for c in commands if c.startswith("export ")]
    submit = next(c for c in commands if c.startswith("ray job submit"))
    before_submit = commands[: commands.index(submit)]
    listing = commands[commands.index(submit) + 1 :]

    setup = _run(" && ".join(before_submit), env)
    out, _ = setup.communicate(timeout=120)
    assert setup.returncode == 0, out

    storage = home / "leviathan" / "runs"
    with LiveServer(make_settings(ray_cluster, storage)) as server, server.client() as api:
        job = _run(" && ".join([*exports, submit]), env, start_new_session=True)
        try:
            body = _wait_for_workers(api, storage, job, timeout=600)
            assert body["leviathan"] and body["run_name"] == "cluster-demo", body
            assert body["run_dir"] == str(storage / "cluster-demo"), body
            members = {m["member"] for m in body["members"]}
            assert body["phase1_steps"] == 300 and {f"m{i}.{j}" for i in range(4) for j in range(2)} <= members, body
            r = api.post(f"/v1/jobs/{body['job_id']}/stop")
            assert r.status_code == 200, r.text
            out, _ = job.communicate(timeout=120)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, 9)
                job.wait()
        assert "submitted successfully" in out, out[-3000:]

        lister = _run(" && ".join([*exports, *listing]), env)
        listed, _ = lister.communicate(timeout=120)
        assert lister.returncode == 0, listed
        assert body["job_id"] in listed, listed[-3000:]


def _wait_for_workers(api, storage: Path, job: subprocess.Popen, timeout: float) -> dict:
    """Poll the API until the README's job runs and its log shows the workers' collective
    check (or fail with the submitting command's output); its detail then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.poll() is None, job.stdout.read()[-3000:]
        for summary in api.get("/v1/jobs", params={"limit": 500}).json()["jobs"]:
            if summary["run_dir"] == str(storage / "cluster-demo") and summary["status"] == "RUNNING":
                logs = api.get(f"/v1/jobs/{summary['job_id']}/logs").text
                if "[leviathan cluster-demo rank 0] collectives checked" in logs:
                    return api.get(f"/v1/jobs/{summary['job_id']}").json()
        time.sleep(1)
    raise AssertionError(f"the README's job did not start its workers in {timeout:.0f}s")
