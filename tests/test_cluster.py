"""The cluster: ray_cluster.yaml against Ray's own schema, and real two-node Ray clusters on this machine.

The two-node tests start `ray start --head` and `ray start --address` as separate processes, each in
its own session with a private --temp-dir and free ports, with token authentication on and one
random token for all nodes and the driver. They never run `ray stop` (it kills every Ray on the
machine, other people's test runs included): teardown SIGKILLs only the processes these tests started
and their descendants.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
N_SMOKE_TRIALS = 3
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else shutil.which("ray") or "ray"
NODE_ID_RE = re.compile(r"Setting node ID node_id=([0-9a-f]{56})")


# ---------------------------------------------------------------------------
# ray_cluster.yaml
# ---------------------------------------------------------------------------

def _prepared_cluster_config() -> dict:
    """What `ray up` validates: the file merged with the provider's defaults (no cloud calls)."""
    from ray.autoscaler._private.util import prepare_config
    return prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))


def test_cluster_yaml_passes_rays_schema_validation() -> None:
    from ray.autoscaler._private.util import validate_config
    config = _prepared_cluster_config()
    validate_config(config)   # raises jsonschema.ValidationError / ValueError on a bad config
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu_workers = [t for name, t in types.items() if name != config["head_node_type"]
                   and t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert config["provider"]["type"] == "aws"
    assert head["resources"].get("CPU") == 0, "the head runs the driver and MLflow, not trials"
    assert gpu_workers and all(1 <= t["min_workers"] <= t["max_workers"] for t in gpu_workers)
    assert "/home/ubuntu/lambda-compat" in config["file_mounts"]
    assert any("pip install" in c and "-e ~/lambda-compat" in c for c in config["setup_commands"])
    assert any("/mnt/shared" in c and "mount" in c for c in config["setup_commands"])


def test_cluster_yaml_is_rejected_when_broken() -> None:
    """The validation the first test relies on does reject bad configs."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config
    config = _prepared_cluster_config()
    config["available_node_types"]["worker.gpu"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)
    config = _prepared_cluster_config()
    config["max_workers"] = 0   # below the GPU type's min_workers
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(config)


def test_cluster_yaml_keeps_token_auth_and_services_on_loopback() -> None:
    config = _prepared_cluster_config()
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    # One token, every node, token mode on every `ray start`.
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    # Dashboard and MLflow only on 127.0.0.1 (reached through `ray dashboard` / `ray attach --port-forward`).
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start + worker_start
    assert re.search(r"mlflow server --host 127\.0\.0\.1 --port 5000 .*--workers 1", head_start)
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in head_start
    assert "sqlite:////mnt/shared/mlflow.db" in head_start
    assert "LAMBDA_COMPAT_CACHE=/mnt/shared/cache" in head_start and "LAMBDA_COMPAT_CACHE=/mnt/shared/cache" in worker_start
    assert "8265" not in json.dumps(config["provider"]) and "5000" not in json.dumps(config["provider"])
    docs = (ROOT / "docs" / "cluster.md").read_text()
    for step in ("ray up ray_cluster.yaml", "ray job submit", "--port-forward 5000", "ray down ray_cluster.yaml",
                 "--storage /mnt/shared/ray_results", "KubeRay", "GCP"):
        assert step in docs, step


# ---------------------------------------------------------------------------
# A real two-node cluster on this machine
# ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Node:
    def __init__(self, proc: subprocess.Popen, temp_dir: Path, log: Path) -> None:
        self.proc, self.temp_dir, self.log = proc, temp_dir, log

    def pids(self) -> set[int]:
        """`ray start --block` and everything it spawned (raylet, GCS, agents, Ray workers)."""
        out = {self.proc.pid}
        try:
            out |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter():   # anything re-parented but still in the node's session
            try:
                if os.getsid(p.pid) == self.proc.pid:
                    out.add(p.pid)
            except (ProcessLookupError, PermissionError):
                pass
        return out

    def node_id(self) -> str:
        for raylet_log in sorted(self.temp_dir.glob("session_*/logs/raylet.out")):
            found = NODE_ID_RE.search(raylet_log.read_text(errors="replace"))
            if found:
                return found.group(1)
        raise AssertionError(f"no node id in {self.temp_dir}")

    def kill(self) -> None:
        """SIGKILL the node: its process group first, then any descendant that left it."""
        pids = self.pids()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class LoopbackCluster:
    """`ray start --head` plus `ray start --address` workers, as separate processes on this machine."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"   # Ray itself resolves 127.0.0.1 to this host's IP
        self.head: _Node | None = None
        self.workers: list[_Node] = []

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> _Node:
        temp_dir = self.root / name
        log = self.root / f"{name}.log"
        cmd = [RAY, "start", "--block", "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(temp_dir),
               "--disable-usage-stats", *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env or self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        node = _Node(proc, temp_dir, log)
        deadline = time.time() + 120
        while time.time() < deadline:
            text = log.read_text(errors="replace")
            if "Ray runtime started" in text:
                return node
            if proc.poll() is not None:
                node.kill()
                raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.3)
        node.kill()
        raise RuntimeError(f"`{' '.join(cmd)}` did not start within 120 s:\n{log.read_text(errors='replace')[-3000:]}")

    def start_head(self) -> _Node:
        self.head = self._start("head", [
            "--head", "--port", str(self.port), "--include-dashboard", "false",
            "--dashboard-port", str(_free_port()),
        ])
        return self.head

    def add_worker(self, name: str | None = None, env: dict[str, str] | None = None) -> _Node:
        node = self._start(name or f"worker{len(self.workers)}", ["--address", self.address], env)
        self.workers.append(node)
        return node

    def close(self) -> None:
        for node in [*self.workers, self.head]:
            if node is not None:
                node.kill()


def _cluster_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({
        "RAY_AUTH_MODE": "token",                 # every node and the driver: token auth, one token
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # (the env var wins over ~/.ray/auth_token)
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    })
    return env


@pytest.fixture(scope="module")
def cluster():
    # A short private temp dir: Ray's Unix socket paths must stay under ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="lc-ray-"))
    c = LoopbackCluster(root, _cluster_env())
    try:
        c.start_head()
        c.add_worker()
        yield c
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def _study_cmd(space: Path, workdir: Path, address: str) -> list[str]:
    return [sys.executable, str(ROOT / "study" / "run.py"), "--space", str(space), "--address", address,
            "--storage", str(workdir / "ray_results"), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--no-report"]


def _run_study(cmd: list[str], workdir: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"study did not finish within {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _children(workdir: Path, study: str = "smoke") -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], filter_string="tags.`lc.role` = 'trial'")


def _smoke_variant(tmp_path: Path, *, epochs: int, max_failures: int = 0) -> Path:
    """smoke.yaml (same three trials) with longer trials and/or retries.

    Longer trials because Tune reuses actors (study.tune: reuse_actors=True): when a trial ends, its
    actor takes over the next PENDING trial and the actor still starting for that trial on the other
    node is removed. With smoke.yaml's 3-epoch trials (~2 s each) one node can run all three before
    the other node's worker process is up (seen here 2 runs in 6), so the study would not show both
    nodes. Ten epochs keep a trial running longer than a Ray worker takes to start.
    """
    space = yaml.safe_load(SMOKE.read_text())
    space["train"]["epochs"] = epochs
    space["max_failures"] = max_failures
    path = tmp_path / f"smoke_e{epochs}_f{max_failures}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def test_study_runs_trials_on_both_nodes(cluster: LoopbackCluster, tmp_path: Path) -> None:
    space = _smoke_variant(tmp_path, epochs=40)
    proc = _run_study(_study_cmd(space, tmp_path, cluster.address), tmp_path, cluster.env, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = _children(tmp_path)
    assert len(runs) == N_SMOKE_TRIALS and all(r.info.status == "FINISHED" for r in runs)
    nodes = Counter(r.data.tags.get("lc.node_id") for r in runs)
    assert set(nodes) == {cluster.head.node_id(), cluster.workers[0].node_id()}, nodes


def test_node_with_another_token_cannot_join(cluster: LoopbackCluster) -> None:
    """Token auth is on: a node started with a different token is refused by the head."""
    n_workers = len(cluster.workers)
    with pytest.raises(RuntimeError, match="InvalidAuthToken|AuthenticationError"):
        cluster.add_worker("intruder", env={**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    assert len(cluster.workers) == n_workers


def _results_by_trial(storage: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in storage.glob("*/*/result.json"):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass   # a line being written
        out[path.parent.name] = rows
    return out


def _alive(pids: set[int], timeout: float = 10.0) -> list[int]:
    """The pids still running (not zombies) after waiting up to `timeout` for them to die."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    deadline = time.time() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def test_node_lost_mid_trial_is_retried_and_study_completes(cluster: LoopbackCluster, tmp_path: Path) -> None:
    if not cluster.workers or cluster.workers[-1].proc.poll() is not None:
        cluster.add_worker()
    worker = cluster.workers[-1]
    head_id, worker_id = cluster.head.node_id(), worker.node_id()
    # Retries allowed (smoke.yaml has max_failures: 0), trials long enough to be killed mid-way.
    cmd = _study_cmd(_smoke_variant(tmp_path, epochs=60, max_failures=3), tmp_path, cluster.address)
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    storage = tmp_path / "ray_results"
    killed_trial = None
    try:
        deadline = time.time() + 420
        while killed_trial is None:   # a trial that has reported an epoch, but not its end, from the worker
            assert time.time() < deadline, "no trial ran on the worker node within 420 s"
            assert driver.poll() is None, f"the study ended before a trial ran on the worker:\n{(tmp_path / 'driver.log').read_text()[-3000:]}"
            worker_pids = worker.pids()
            for trial_dir, rows in _results_by_trial(storage).items():
                if rows and rows[-1].get("pid") in worker_pids and not rows[-1].get("final"):
                    killed_trial = trial_dir
                    break
            time.sleep(0.3)
        worker.kill()
        assert not _alive(worker_pids), f"worker node processes survived SIGKILL: {_alive(worker_pids)}"
        driver.wait(timeout=420)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        log.close()
    text = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, text[-4000:]
    runs = _children(tmp_path)
    names = Counter(r.info.run_name for r in runs)
    assert len(runs) == N_SMOKE_TRIALS and set(names.values()) == {1}, names
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    # Trial folders are named `<trial name>_<Ray trial id>`; the child run is named after the trial.
    retried = next(r for r in runs if killed_trial.startswith(f"{r.info.run_name}_"))
    # The killed trial was run again on the surviving node and finished there.
    assert retried.data.tags.get("lc.node_id") == head_id != worker_id
