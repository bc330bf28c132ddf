"""Run many training configurations side by side and collect their results in one file.

Each line of the configuration file is a label and the training CLI's arguments; blank
lines and lines starting with '#' are skipped. Every run gets its own folder and log, a
fixed number of BLAS threads, and its metrics are appended to the results file (JSON
lines) as soon as it ends, so an interrupted sweep keeps what finished.

    python3 experiments/sweep.py experiments/sweep_small.txt --jobs 8 --threads 2 \
        --out-dir runs/sweep-small --results runs/sweep-small.jsonl

With --refit-top-k K, each finished run's head is also refitted on its top K layers
(same head settings as the run), and that test error is stored as refit_test_error.

With --resume, a run whose folder holds a checkpoint goes on from its last finished epoch
(the training CLI's --resume, with the same flags), and a run whose folder already holds its
metrics is not run again: its record is written only if the results file lacks it. Runs
too long for one sitting are started and continued with the same command.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import ff_hybrid_mnist as ff  # noqa: E402


def read_configs(path):
    """[(label, args)]; a line `base ARGS...` sets flags that every later line starts from
    (a later flag overrides, as argparse keeps the last occurrence)."""
    configs, base = [], []
    for n, line in enumerate(open(path), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label, *args = shlex.split(line)
        if "--out" in args or "--resume" in args:
            raise ValueError(f"{path}:{n}: the sweep sets --out itself")
        if label == "base":
            base = args
            continue
        configs.append((label, base + args))
    labels = [c[0] for c in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{path}: labels repeat")
    return configs


def write_record(record, ns, lock):
    with lock:
        with open(ns.results, "a") as f:
            f.write(json.dumps(record) + "\n")


def recorded_labels(path):
    """Labels with a finished record in the results file."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {r["label"] for r in map(json.loads, filter(str.strip, f))
                if r.get("status") == "finished"}


def run_one(label, args, ns, lock, deadline):
    run_dir = os.path.join(ns.out_dir, label)
    finished = os.path.exists(os.path.join(run_dir, "metrics.json"))
    if ns.resume and finished and label in recorded_labels(ns.results):
        with lock:
            print(f"{label:24s} finished earlier: recorded in {ns.results}", flush=True)
        return
    if time.time() > deadline:
        write_record({"label": label, "args": args, "rc": None, "status": "not started",
                      "commit": ns.commit}, ns, lock)
        with lock:
            print(f"{label:24s} not started: past --start-within", flush=True)
        return
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(ns.threads), OMP_NUM_THREADS=str(ns.threads),
               MKL_NUM_THREADS=str(ns.threads), PYTHONUNBUFFERED="1")
    resumed = ns.resume and not finished and os.path.exists(
        os.path.join(run_dir, "checkpoint.npz"))
    cmd = [sys.executable, os.path.join(ROOT, "ff_hybrid_mnist.py"), *args,
           "--resume" if resumed else "--out", run_dir]
    t0 = time.time()
    if ns.resume and finished:  # ended, but the sweep stopped before writing its record
        rc = 0
    else:
        with open(run_dir + ".log", "a" if resumed else "w") as log:
            if resumed:
                log.write(f"--- resumed by the sweep, commit {ns.commit} ---\n")
                log.flush()
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = None if ns.resume and finished else time.time() - t0  # unknown: ran earlier
    record = {"label": label, "args": args, "rc": rc, "wall_seconds": wall,
              "status": "finished" if rc == 0 else "failed", "commit": ns.commit,
              "threads": ns.threads, "resumed": bool(resumed)}
    if rc == 0:
        record["metrics"] = json.load(open(os.path.join(run_dir, "metrics.json")))
        record["environment"] = json.load(open(os.path.join(run_dir, "history.json")))[
            "environment"]
        if ns.refit_top_k:
            run_args = json.load(open(os.path.join(run_dir, "args.json")))
            out = subprocess.run(
                [sys.executable, os.path.join(HERE, "refit_head.py"), "--run", run_dir,
                 "--top-k", str(ns.refit_top_k), "--seed", str(run_args["seed"]),
                 "--softmax-epochs", str(run_args["softmax_epochs"]),
                 "--softmax-lr", str(run_args["softmax_lr"]),
                 "--softmax-weight-decay", str(run_args["softmax_weight_decay"])],
                capture_output=True, text=True, env=env)
            record["refit_rc"] = out.returncode
            if out.returncode == 0:
                refit = json.loads(out.stdout.strip().splitlines()[-1])
                record["refit_top_k"] = ns.refit_top_k
                record["refit_test_error"] = refit["test_error"]
                record["refit_val_error"] = refit["val_error"]
    write_record(record, ns, lock)
    with lock:
        err = record.get("metrics", {}).get("test_error")
        val = record.get("metrics", {}).get("val_error")
        print(f"{label:24s} rc {rc}  "
              + ("" if wall is None else f"{wall:7.1f} s  ")
              + (f"val error {100 * val:.2f}%  " if val is not None else "")
              + f"test error {'-' if err is None else f'{100 * err:.2f}%'}"
              + (f"  top-{ns.refit_top_k} {100 * record['refit_test_error']:.2f}%"
                 if "refit_test_error" in record else ""), flush=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("configs", help="file of lines: label, then training flags")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=2, help="BLAS threads per run")
    p.add_argument("--out-dir", required=True, help="folder of the run folders and logs")
    p.add_argument("--results", required=True, help="JSON-lines file, appended to")
    p.add_argument("--refit-top-k", type=int, default=0,
                   help="also refit each run's head on its top K layers (0: no refit)")
    p.add_argument("--start-within", type=float, default=float("inf"),
                   help="start no run after this many seconds")
    p.add_argument("--resume", action="store_true",
                   help="go on with runs whose folder holds a checkpoint; skip recorded ones")
    p.add_argument("--dry-run", action="store_true",
                   help="check every run's flags and folder with the training CLI, then exit")
    return p


def main(argv=None):
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.jobs < 1 or ns.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    configs = read_configs(ns.configs)
    if ns.dry_run:
        def check():
            for label, args in configs:
                run_dir = os.path.join(ns.out_dir, label)
                go_on = ns.resume and os.path.exists(os.path.join(run_dir, "checkpoint.npz"))
                ff.parse_args(args + ["--resume" if go_on else "--out", run_dir])
                print(f"{label:24s} ok: {shlex.join(args)}")
            return 0
        return ff.exit_status(check)
    ns.commit = ff.code_commit()
    os.makedirs(ns.out_dir, exist_ok=True)
    print(f"{len(configs)} runs, {ns.jobs} at once, {ns.threads} BLAS threads each", flush=True)
    lock = threading.Lock()
    deadline = time.time() + ns.start_within
    with ThreadPoolExecutor(ns.jobs) as pool:
        for f in [pool.submit(run_one, label, args, ns, lock, deadline) for label, args in configs]:
            f.result()


if __name__ == "__main__":
    sys.exit(main())
