"""Benchmark: paper-scale features on one node (issue 10).

Runs the real CLI (`python study/run.py` as a subprocess) on spaces it writes with the
synthetic source (no images, no model), and samples, every `--interval` s, the RSS of
the driver and of every process below it (psutil; Ray's raylet/GCS and workers), and
the bytes in /dev/shm (the object store's memory):

  study x1/10, study x1   one pair synthetic_1280 -> synthetic_1536 on a synthetic set
                          whose train split holds `--rows` rows (x1: 900,000 rows, 10.1 GB
                          of float32 train features, above this machine's default object
                          store), eval 5,000 rows, affine and lambda trials of a few steps.
                          Judged: both complete; the driver's peak RSS is flat (within 10% or
                          150 MB between the volumes) and under 1.5 GB; each trial worker's
                          anonymous memory (no private copy of its keys) is flat and its RSS
                          within its keys' bytes + a small-data trial's RSS (an idle worker's
                          RSS is reported beside it).
  extraction              `python -m backbones extract` of a 200,000-image synthetic split
                          (64 px noise images made on the fly) with tf_efficientnet_lite0,
                          the real extraction path: peak RSS < 1 GB. SIGKILLed when half its
                          shards are recorded, the rerun embeds only the missing shards.

    python benchmarks/bench_scale.py            # full (about 25 min on a 2-core AMD EPYC)
    python benchmarks/bench_scale.py --quick    # 90,000 / 9,000 rows, eval 2,000, 20,000 images

Trial workers memory-map their keys, and RSS counts every mapped page of the shared page
cache (the kernel maps pages around each random row read), so a trial's RSS grows towards
its keys' bytes (shared, reclaimable page cache) while its anonymous memory (RssAnon: heap and
any private copy) stays that of a trial on small data.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

MiB = 1 << 20
SPACE = """
name: {name}
description: bench_scale, {rows} train rows
pairs:
  - {{old: synthetic_1280, new: synthetic_1536}}
datasets:
  - {{name: {dataset}}}
zero_shot: [{zero_shot}]
methods: [affine, lambda]
lambdas: [12]
seeds: [0]
train: {{epochs: 2, steps_per_epoch: {steps}, batch_size: 1024, eval_every: 1, num_threads: 1}}
features: {{dtype: {dtype}}}
max_failures: 0
"""


class Sampler(C.PeriodicSampler):
    """RSS of a process tree by role (driver, trial workers, extraction tasks, other) and /dev/shm use."""

    def __init__(self, root_pid: int, interval: float) -> None:
        import psutil

        super().__init__(interval)
        self.ps = psutil
        self.root = psutil.Process(root_pid)
        self.peak: dict[str, float] = {"driver": 0, "shm": 0, "total": 0}
        self.workers: dict[int, dict] = {}  # pid -> {"role", "peak" (RSS), "anon" (RssAnon: heap, not mapped files)}
        self.shm0 = shutil.disk_usage("/dev/shm").used

    @staticmethod
    def role(cmd: list[str]) -> str:
        text = " ".join(cmd)
        if "ray::" not in text:
            return "other"
        if "_extract_shard" in text or "_plan" in text or "_finish" in text:
            return "extraction"
        if "ImplicitFunc" in text or "run_one" in text:
            return "trial"
        return "worker"

    def tick(self) -> None:
        total = 0
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except self.ps.NoSuchProcess:
            return
        for p in procs:
            try:
                rss = p.memory_info().rss
                cmd = p.cmdline()
            except (self.ps.NoSuchProcess, self.ps.AccessDenied, self.ps.ZombieProcess, OSError):
                continue
            total += rss
            if p.pid == self.root.pid:
                self.peak["driver"] = max(self.peak["driver"], rss)
                continue
            w = self.workers.setdefault(p.pid, {"role": "other", "peak": 0, "anon": 0, "cmd": " ".join(cmd)[:80]})
            role = self.role(cmd)
            if role != "other" and w["role"] in ("other", "worker"):
                w["role"] = role
            w["peak"] = max(w["peak"], rss)
            if w["role"] == "trial":
                anon = C.rss_anon(p.pid)
                w["anon"] = max(w["anon"], anon)
                w["file"] = max(w.get("file", 0), rss - anon)
        self.peak["total"] = max(self.peak["total"], total)
        self.peak["shm"] = max(self.peak["shm"], shutil.disk_usage("/dev/shm").used - self.shm0)

    def by_role(self, role: str, what: str = "peak") -> list[int]:
        return sorted(w.get(what, 0) for w in self.workers.values() if w["role"] == role)


def _env(cache: Path) -> dict[str, str]:
    """This environment with the bench's cache, and the allocator settings a study gives its Ray workers
    (study.tune.WORKER_ENV_DEFAULTS), so that a bare extraction process runs as a worker does."""
    from study.tune import WORKER_ENV_DEFAULTS

    return {**WORKER_ENV_DEFAULTS, **os.environ, "LAMBDA_COMPAT_CACHE": str(cache)}


def run_study(rows: int, work: Path, cache: Path, args) -> dict:
    dataset = f"synthetic-c100-train{rows}-test{args.eval_rows}"
    zero_shot = f"synthetic-c50-train10-test{args.eval_rows}-s1"
    name = f"scale-{rows}"
    space = work / f"{name}.yaml"
    space.write_text(SPACE.format(name=name, rows=rows, dataset=dataset, zero_shot=zero_shot, steps=args.steps,
                                  dtype=args.dtype))
    cmd = [sys.executable, str(C.ROOT / "study" / "run.py"), "--space", str(space), "--storage", str(work / "ray"),
           "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--num-cpus", str(args.num_cpus), "--no-report"]
    t0 = time.perf_counter()
    log = open(work / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(cache), cwd=work)
    with Sampler(proc.pid, args.interval) as s:
        rc = proc.wait()
    log.close()
    text = (work / f"{name}.log").read_text()
    itemsize = 2 if args.dtype == "float16" else 4
    train_bytes = rows * (1280 + 1536) * itemsize
    own = (rows + args.eval_rows) * (1280 + 1536) * itemsize + args.eval_rows * 1536 * itemsize  # + labels (small)
    return {
        "rows": rows, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
        "feature_bytes": train_bytes + (2 * args.eval_rows) * (1280 + 1536) * itemsize // 2 + args.eval_rows * 1536 * itemsize,
        "trial_key_bytes": own,
        "driver_peak_mib": s.peak["driver"] / MiB, "tree_peak_mib": s.peak["total"] / MiB,
        "shm_peak_mib": s.peak["shm"] / MiB,
        "trial_peaks_mib": [v / MiB for v in s.by_role("trial")],
        "trial_anon_peaks_mib": [v / MiB for v in s.by_role("trial", "anon")],
        "trial_file_peaks_mib": [v / MiB for v in s.by_role("trial", "file")],
        "extraction_peaks_mib": [v / MiB for v in s.by_role("extraction")],
        "progress_lines": [ln for ln in text.splitlines() if "img/s" in ln][-3:],
        "tail": text.splitlines()[-3:] if rc else [],
    }


def idle_worker_baseline(work: Path) -> dict:
    """RSS and USS of a Ray trial worker that imports what a trial imports and reports once (no features)."""
    code = (
        "import json, ray, time; from ray import tune\n"
        "from study.tune import init_ray\n"
        "def idle(config):\n"
        "    import psutil, torch, numpy, study.science.trial  # what a trial imports\n"
        "    time.sleep(2); m = psutil.Process().memory_full_info()\n"
        "    anon = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('RssAnon:')][0]\n"
        "    tune.report({'rss': m.rss, 'uss': m.uss, 'anon': anon})\n"
        "init_ray(None, 1)\n"
        f"r = tune.Tuner(idle, run_config=tune.RunConfig(storage_path='{work / 'idle'}', verbose=0)).fit()\n"
        "print(json.dumps({k: r[0].metrics[k] for k in ('rss', 'uss', 'anon')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "RAY_ADDRESS": "local"}, cwd=work)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: v / MiB for k, v in got.items()}


def run_extraction(images: int, work: Path, cache: Path, args) -> dict:
    dataset = f"synthetic-c10-train{images}-test100"
    cmd = [sys.executable, "-m", "backbones", "extract", "--backbone", "tf_efficientnet_lite0", "--dataset", dataset,
           "--split", "train", "--quiet"]
    n_shards = -(-images // args.shard_rows)
    cmd += ["--shard-rows", str(args.shard_rows)]
    records = lambda: list(cache.glob(f"features/{dataset}/train/*/shards/*.json"))  # noqa: E731
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cache), cwd=C.ROOT)
    with Sampler(proc.pid, args.interval) as s:
        while proc.poll() is None and len(records()) < n_shards // 2:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = len(records())
    first_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cache), cwd=C.ROOT)
    with Sampler(proc.pid, args.interval) as s2:
        out, err = proc.communicate()
    m = re.search(r"embedded (\d+) of (\d+) shards", err)
    return {
        "images": images, "shards": n_shards, "shards_done_when_killed": killed_at,
        "shards_embedded_on_rerun": int(m.group(1)) if m else None, "rerun_rc": proc.returncode,
        "first_run_s": round(first_s, 1), "rerun_s": round(time.perf_counter() - t1, 1),
        "images_per_s_rerun": round((n_shards - killed_at) * args.shard_rows / (time.perf_counter() - t1), 1),
        "peak_rss_mib": max(s.peak["driver"], s2.peak["driver"]) / MiB, "stderr_tail": err.strip().splitlines()[-2:],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="90,000 / 9,000 rows and 20,000 images")
    p.add_argument("--rows", type=int, default=900_000, help="train rows of the full study (x1)")
    p.add_argument("--eval-rows", type=int, default=5_000)
    p.add_argument("--steps", type=int, default=10, help="steps per epoch (2 epochs)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--images", type=int, default=200_000, help="images of the extraction run")
    p.add_argument("--shard-rows", type=int, default=16_384)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("--work", default=None, help="work folder (default: a temp folder, removed at the end)")
    p.add_argument("--out", default=str(C.ROOT / "benchmarks" / "results" / "scale.json"))
    args = p.parse_args()
    if args.quick:
        args.rows, args.images, args.shard_rows, args.eval_rows = 90_000, 20_000, 2_048, 2_000
        args.out = args.out.replace("scale.json", "scale_quick.json")
    C.setup_env(fresh_cache=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="lambda-compat-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    try:
        idle = idle_worker_baseline(work)
        print(f"idle trial worker: {idle['rss']:.0f} MiB RSS, {idle['uss']:.0f} MiB USS, {idle['anon']:.0f} MiB anonymous",
              flush=True)
        studies = []
        for rows in (args.rows // 10, args.rows):
            r = run_study(rows, work, cache, args)
            studies.append(r)
            print(f"study {rows:,} rows ({r['feature_bytes'] / 1e9:.2f} GB of features): rc {r['rc']}, "
                  f"{r['seconds']:.0f} s, driver peak {r['driver_peak_mib']:.0f} MiB, trial peaks "
                  f"{[round(v) for v in r['trial_peaks_mib']]} MiB RSS {[round(v) for v in r['trial_anon_peaks_mib']]} MiB anonymous, /dev/shm peak {r['shm_peak_mib']:.0f} MiB",
                  flush=True)
            shutil.rmtree(cache / "features", ignore_errors=True)  # disk: one volume at a time
        ext = run_extraction(args.images, work, cache, args)
        print(f"extraction of {args.images:,} images: killed with {ext['shards_done_when_killed']}/{ext['shards']} "
              f"shards, rerun embedded {ext['shards_embedded_on_rerun']}; peak RSS {ext['peak_rss_mib']:.0f} MiB",
              flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    small, big = studies
    flat = abs(big["driver_peak_mib"] - small["driver_peak_mib"])
    checks = {
        "both studies complete": small["rc"] == 0 and big["rc"] == 0,
        "features >= 10 GB (full run)": big["feature_bytes"] >= 10e9,
        "driver flat (<= 10% or 150 MB)": flat <= max(0.1 * small["driver_peak_mib"], 150),
        "driver < 1.5 GB": big["driver_peak_mib"] < 1536,
        # RSS = anonymous (heap, any private copy) + mapped files (shared libraries, the memory-mapped keys)
        "trial anonymous memory flat (no private copy; <= 10% or 150 MB)": max(big["trial_anon_peaks_mib"]) <= max(
            1.1 * max(small["trial_anon_peaks_mib"]), max(small["trial_anon_peaks_mib"]) + 150),
        "trial RSS <= own keys + a small-data trial's RSS": max(big["trial_peaks_mib"]) <= (
            big["trial_key_bytes"] / MiB + max(small["trial_peaks_mib"])),
        "extraction < 1 GB": ext["peak_rss_mib"] < 1024,
        "rerun embeds only the missing shards": ext["shards_embedded_on_rerun"] == ext["shards"] - ext["shards_done_when_killed"],
    }
    if args.quick:
        checks.pop("features >= 10 GB (full run)")
    result = {"benchmark": "scale", "quick": args.quick, "args": vars(args), "idle_worker_mib": idle,
              "studies": studies, "extraction": ext, "checks": checks}
    path = C.write_result(result, args.out)
    rows = [(f"{r['rows']:,}", f"{r['feature_bytes'] / 1e9:.2f}", r["rc"], f"{r['seconds']:.0f}",
             f"{r['driver_peak_mib']:.0f}", " / ".join(f"{v:.0f}" for v in r["trial_peaks_mib"]),
             " / ".join(f"{v:.0f}" for v in r["trial_anon_peaks_mib"]),
             " / ".join(f"{v:.0f}" for v in r["trial_file_peaks_mib"]), f"{r['trial_key_bytes'] / MiB:.0f}",
             f"{r['shm_peak_mib']:.0f}") for r in studies]
    print(C.header_line(result["machine"]))
    print(C.markdown_table(("train rows", "features GB", "rc", "s", "driver peak MiB", "trial RSS peaks MiB",
                            "trial anonymous peaks MiB", "trial mapped-file peaks MiB", "trial's keys MiB", "/dev/shm peak MiB"), rows))
    for k, ok in checks.items():
        print(f"{C.verdict(ok):8s} {k}")
    print(f"-> {path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
