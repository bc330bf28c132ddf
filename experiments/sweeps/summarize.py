"""Markdown tables of sweep records: one row per run, and the seed groups' mean +- spread.

Runs whose labels differ only in a final `-sN` (seed N) form a group; a group's row gives
the mean +- standard deviation (n - 1) of each error over its seeds. Errors of the goodness
read-out (supervised runs) appear when a record has them. Validation error comes first:
settings are chosen on it; test error is reported beside it.

A label recorded more than once (a run resumed or extended by its sweep, a file given
twice) is one run, counted once: its last finished record is used (else its last), with a
warning where two of them finished. A seed group whose runs
differ in more than --seed (records of other experiments given together) gets no mean row,
with a warning naming the records and the flags. A record that is not JSON, not UTF-8, or
lacks a field or has one of the wrong type ends the script with one line naming the file
and line (exit 1).

    python3 -m experiments.sweeps.summarize experiments/results/spec-budget.jsonl
"""
import argparse
import re
import statistics
import sys

from experiments.records import (OneLineParser, RecordsError, finished as finished_runs,
                                 main_of, one_experiment, read_records)


COLUMNS = [  # (heading, key in metrics)
    ("val error", "val_error"), ("test error", "test_error"),
    ("goodness val error", "goodness_val_error"), ("goodness test error", "goodness_test_error"),
    ("head-along val error", "hard_head_val_error"), ("head-along test error", "hard_head_test_error"),
]


FINISHED = {"metrics": {"ff_seconds": float, **{k + "?": (float, None) for _, k in COLUMNS}}}


def pct(x):
    return "-" if x is None else f"{100 * x:.2f}%"


def table(records):
    finished = finished_runs(records)
    if not finished:
        raise RecordsError("no finished run with metrics in the results")
    cols = [(h, k) for h, k in COLUMNS if any(k in r["metrics"] for r in finished)]
    head = "| run | " + " | ".join(h for h, _ in cols) + " | FF s | commit |"
    lines = [head, "|---" * (len(cols) + 3) + "|"]
    for r in records:
        if r not in finished:
            lines.append(f"| {r['label']} | {r.get('status', 'failed')} (rc {r.get('rc')}) |"
                         + " |" * (len(cols) + 1))
            continue
        m = r["metrics"]
        lines.append(f"| {r['label']} | " + " | ".join(pct(m.get(k)) for _, k in cols)
                     + f" | {m['ff_seconds']:.0f} | {r.get('commit') or '-'} |")
    for name, rs in seed_groups(finished).items():
        cells = []
        for _, k in cols:
            xs = [100 * r["metrics"][k] for r in rs if r["metrics"].get(k) is not None]
            cells.append("-" if len(xs) < 2 else
                         f"**{statistics.mean(xs):.2f} +- {statistics.stdev(xs):.2f}%**")
        seeds = "/".join(re.fullmatch(r".*-s(\d+)", r["label"]).group(1) for r in rs)
        lines.append(f"| {name}, seeds {seeds} | " + " | ".join(cells) + " | | |")
    return "\n".join(lines)


def seed_groups(finished):
    """{name: runs} of the labels NAME-sN with two runs or more, each a run of one
    experiment with its seeds: a group mixing configurations is left out (warned)."""
    groups = {}
    for r in finished:
        match = re.fullmatch(r"(.*)-s(\d+)", r["label"])
        if match:
            groups.setdefault(match.group(1), []).append(r)
    return {name: rs for name, rs in groups.items() if len(rs) >= 2
            and one_experiment_or_warn(name, rs)}


def one_experiment_or_warn(name, rs):
    """Whether the runs differ in their seed and in nothing else; else a warning."""
    try:
        one_experiment(rs, "--seed", 0, "a mean over seeds needs one configuration's runs, "
                                       "each seed once; no mean given")
    except RecordsError as e:
        print(f"warning: seed group {name}: {e}", file=sys.stderr)
        return False
    return True


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON-lines files written by sweep.py")
    args = p.parse_args(argv)
    return main_of(lambda: print(table(read_records(args.results, FINISHED))))


if __name__ == "__main__":
    sys.exit(main())
