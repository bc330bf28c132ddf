"""The sweep runner before Dask (experiments/sweep.py at --old, a thread pool) against the
current one (a LocalCluster) on the same small sweep: the wall-clock of each sitting, and
a check that both write the same records apart from the timing fields.

    python3 -m bench.sweep_runners > experiments/results/sweep-runner-old-vs-new.txt

The old runner is copied into experiments/, where it was then, for the measurement, so
both train with the same ff_hybrid_mnist.py and store the same commit; both write into the
same --out-dir path, so the run folders named in the metrics agree. Sittings alternate old, new, old, ...
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_LIST = """\
base --layer-sizes 784,100,100 --n-epochs 3 --n-train 2000 --batch-size 50 --softmax-epochs 2 --top-k 2
th2
th8 --threshold 8
seed1 --seed 1
blur2 --n-blur 2
"""
TIMING = {"wall_seconds"}  # and in metrics: what a clock or the memory high-water mark gave
METRIC_TIMING = {"ff_seconds", "softmax_seconds", "feature_seconds", "total_seconds",
                 "goodness_seconds", "peak_rss_mib"}


def sitting(command, work, name):
    """(seconds, {label: record}) of one sweep of SWEEP_LIST by command (run from the
    repository root)."""
    runs, results = os.path.join(work, "runs"), os.path.join(work, name + ".jsonl")
    shutil.rmtree(runs, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([*command, os.path.join(work, "list.txt"), "--jobs", "2",
                    "--threads", "1", "--out-dir", runs, "--results", results],
                   check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    seconds = time.perf_counter() - t0
    with open(results) as f:
        return seconds, {r["label"]: r for r in map(json.loads, f)}


def without_timing(record):
    kept = {k: v for k, v in record.items() if k not in TIMING}
    kept["metrics"] = {k: v for k, v in record["metrics"].items() if k not in METRIC_TIMING}
    return kept


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", default="7cd0707", help="commit of the runner before Dask")
    p.add_argument("--sittings", type=int, default=3, help="sittings of each runner")
    ns = p.parse_args()
    old_script = os.path.join(ROOT, "experiments", f"sweep_at_{ns.old}.py")
    with open(old_script, "w") as f:
        f.write(subprocess.run(["git", "-C", ROOT, "show", f"{ns.old}:experiments/sweep.py"],
                               capture_output=True, text=True, check=True).stdout)
    load = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="sweep-runners-")
    try:
        with open(os.path.join(work, "list.txt"), "w") as f:
            f.write(SWEEP_LIST)
        # the old runner is a script that finds the repository from its own path; the new
        # one is a module of the experiments package
        runners = {"old": [sys.executable, old_script],
                   "new": [sys.executable, "-m", "experiments.sweeps.sweep"]}
        seconds = {name: [] for name in runners}
        records = {name: [] for name in runners}
        for i in range(ns.sittings):
            for name, command in runners.items():
                s, r = sitting(command, work, f"{name}-{i}")
                seconds[name].append(s)
                records[name].append(r)
    finally:
        os.remove(old_script)
        shutil.rmtree(work, ignore_errors=True)

    print(f"# python3 -m bench.sweep_runners --old {ns.old} --sittings {ns.sittings}")
    print(f"# old: experiments/sweep.py at {ns.old} (threads); new: experiments/sweeps/sweep.py at "
          f"{records['new'][0]['th2']['commit']} (Dask LocalCluster)")
    print(f"# sweep list ({len(records['new'][0])} runs), --jobs 2 --threads 1, "
          f"{os.cpu_count()} CPUs shared with other work (load average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end):")
    for line in SWEEP_LIST.splitlines():
        print(f"#   {line}")
    print("\nwall-clock of a whole sitting, seconds (client start to exit):")
    for name in runners:
        print(f"  {name}: " + "  ".join(f"{s:.2f}" for s in seconds[name])
              + f"   median {statistics.median(seconds[name]):.2f}")
    ratios = [n / o for n, o in zip(seconds["new"], seconds["old"])]
    print("  new/old, sitting by sitting: " + "  ".join(f"{r:.2f}" for r in ratios)
          + f"   median {statistics.median(ratios):.2f}")
    print("\nwall_seconds of each run (median over sittings), old -> new:")
    for label in records["old"][0]:
        old = statistics.median(r[label]["wall_seconds"] for r in records["old"])
        new = statistics.median(r[label]["wall_seconds"] for r in records["new"])
        print(f"  {label:6s} {old:5.2f} -> {new:5.2f}")

    reference = {k: without_timing(v) for k, v in records["old"][0].items()}
    print(f"\nrecords without the timing fields ({', '.join(sorted(TIMING))}; in metrics: "
          f"{', '.join(sorted(METRIC_TIMING))}), against the old runner's first sitting:")
    for name in runners:
        for i, sitting_records in enumerate(records[name]):
            same, added = [], set()
            for label, record in sitting_records.items():
                kept = without_timing(record)
                added |= set(kept) - set(reference[label])
                same.append({k: kept[k] for k in reference[label]} == reference[label])
            print(f"  {name} sitting {i}: {sum(same)} of {len(same)} records identical"
                  + (f" (fields added: {', '.join(sorted(added))})" if added else ""))


if __name__ == "__main__":
    main()
