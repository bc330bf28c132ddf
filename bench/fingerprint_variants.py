"""Fingerprints of tiny real runs of every variant, to show that a refactor changes no result.

Each variant trains 2 FF epochs of 784-40-30-20 on 600 real digits (one BLAS thread, so the
products round the same way each time) through its script's command line, in-process; its
fingerprint is the SHA-256 of every saved array (weights, biases, head) and of the metrics
and histories with the wall-clock fields and the configuration record left out (the record
names the script since the split; the weights, curves and metrics are what must not move).
The variants are written as flags of the one trainer that held every experiment before the
split; ff_runs.script_for picks the script that runs them now. Run it before and after a
change, on the same machine, and compare the two files: every line must be equal. It
fingerprints the code of the repository it runs in (the current folder): to fingerprint the
code as it was, run it in a checkout of that code.

    python3 -m bench.fingerprint_variants --out experiments/results/fingerprints-before.json
    python3 -m bench.fingerprint_variants --out /tmp/after.json --compare experiments/results/fingerprints-before.json
"""
import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy loads: one rounding order

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

import ff_hybrid_mnist as ff  # noqa: E402

TINY = ["--layer-sizes", "784,40,30,20", "--n-train", "600", "--batch-size", "50",
        "--n-epochs", "2", "--top-k", "2", "--val-size", "300"]
LABEL = ["--negatives", "label", "--goodness", "sum", "--threshold", "1"]
VARIANTS = {  # name -> the flags beyond TINY
    "hybrid": [],
    "hybrid-sgd-head": ["--head", "sgd", "--softmax-epochs", "3", "--softmax-lr", "2"],
    "peer-decay": ["--peer-norm", "0.03", "--lr-decay", "linear-half", "--softmax-epochs", "0"],
    "label-hard-goodness": LABEL + ["--hard-negatives", "--softmax-epochs", "0"],
    "label-hard-head": LABEL + ["--hard-negatives", "--hard-from", "head", "--softmax-epochs", "0"],
    "author-recipe": LABEL + [
        "--hard-negatives", "--hard-from", "head", "--optimizer", "sgd", "--normalize", "rms",
        "--init", "fan-in", "--peer-norm", "0.06", "--peer-kind", "author", "--lr", "0.005",
        "--weight-decay", "0.002", "--lr-decay", "linear-half-epochs", "--hard-head-lr", "0.1",
        "--hard-head-weight-decay", "0.003", "--softmax-epochs", "0"],
    "greedy": ["--schedule", "greedy", "--softmax-epochs", "0"],
    "refresh-inputs": ["--refresh-inputs", "--softmax-epochs", "0"],
    "local": ["--local", "10:6:8,2:1:8", "--layer-sizes", "784,128,72", "--softmax-epochs", "0"],
}
TIMES = {"config", "seconds", "ff_seconds", "softmax_seconds", "feature_seconds", "goodness_seconds",
         "checkpoint_seconds", "total_seconds", "peak_rss_mib", "run_dir", "environment"}


def without_times(obj):
    """obj with every wall-clock, memory, path and configuration field left out, at any
    depth."""
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items() if k not in TIMES}
    if isinstance(obj, list):
        return [without_times(v) for v in obj]
    return obj


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(run_dir):
    """{what: short SHA-256} of a finished run folder."""
    out = {}
    with np.load(os.path.join(run_dir, "model.npz")) as z:
        for key in sorted(z.files):
            if key != "config":
                out[key] = hashlib.sha256(np.ascontiguousarray(z[key]).tobytes()).hexdigest()[:16]
    for name in ("metrics.json", "history.json"):
        with open(os.path.join(run_dir, name)) as f:
            out[name] = digest(without_times(json.load(f)))
    return out


def trainer(flags):
    """(main(argv), parse_args(argv), run_experiment, RunInterrupted) of the script that runs
    flags: since the split, the one ff_runs.script_for picks; before it, the one trainer."""
    try:
        import ff_runs
    except ImportError:  # before the split
        return ff.main, ff.parse_args, ff.run_experiment, ff.RunInterrupted, flags
    script, flags = ff_runs.script_for(flags)
    cls = ff_runs.config_class(script)
    return (lambda argv: ff_runs.main(cls, argv),
            lambda argv: ff_runs.parse_args(argv, ff_runs.build_parser(cls)),
            ff_runs.run_experiment, ff_runs.RunInterrupted, flags)


def run_variant(flags, folder, resume=False):
    """The trainer on flags into folder; with resume, stopped after epoch 1 and resumed."""
    main, parse_args, run_experiment, interrupted, flags = trainer(flags)
    if resume:
        def stop(epoch, state):
            raise KeyboardInterrupt
        try:
            run_experiment(parse_args(flags + ["--out", folder]), callback=stop,
                           log=lambda *a, **k: None)
        except interrupted:
            pass
        argv = ["--resume", folder]
    else:
        argv = flags + ["--out", folder]
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            status = main(argv)
        finally:
            sys.stdout = stdout
    if status != 0:
        sys.exit(f"error: the {folder} run failed (exit {status})")
    return fingerprint(folder)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file the fingerprints are written to")
    p.add_argument("--compare", help="a fingerprints file to compare with (exit 1 on any "
                   "difference)")
    args = p.parse_args(argv)
    prints = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, extra in VARIANTS.items():
            prints[name] = run_variant(TINY + extra, os.path.join(scratch, name))
            print(f"{name:22s} {prints[name]['metrics.json']}", flush=True)
        prints["hybrid-resumed"] = run_variant(TINY, os.path.join(scratch, "resumed"), True)
        print(f"{'hybrid-resumed':22s} {prints['hybrid-resumed']['metrics.json']}")
    with open(args.out, "w") as f:
        json.dump(prints, f, indent=1, sort_keys=True)
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        differ = [f"{name}: {key}" for name in sorted(set(before) | set(prints))
                  for key in sorted(set(before.get(name, {})) | set(prints.get(name, {})))
                  if before.get(name, {}).get(key) != prints.get(name, {}).get(key)]
        print("\n".join(["differ:"] + differ) if differ else "every fingerprint is equal")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
