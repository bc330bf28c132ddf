"""Run many training configurations on a Dask cluster and collect their results in one file.

Each line of the sweep list is a label and training flags, written as for the one trainer
that held every experiment before the scripts were split: a line with `--negatives label`
runs ff_label_mnist.py (that flag left out), one with `--local` ff_local_mnist.py, any other
ff_hybrid_mnist.py (ff_runs.script_for), and each record names its `script`; blank lines and
lines starting with '#' are skipped. Each configuration is one task of a `dask.distributed`
cluster: by default a LocalCluster on this machine of --jobs worker processes with one
thread each, or the cluster at --scheduler. A task trains in a subprocess on its worker with
its own run folder and log and --threads BLAS threads, and returns its record; the client
appends each record to the results file (JSON lines) as its task ends, so a sweep that is
stopped keeps what finished. docs/sweeps.md shows the cluster setups.

    python3 -m experiments.sweeps.sweep experiments/sweeps/lists/sweep_small.txt --jobs 8 \
        --threads 2 --out-dir runs/sweep-small --results runs/sweep-small.jsonl

With --refit-top-k K, each finished run's head is also refitted on its top K layers
(same head settings as the run), and that test error is stored as refit_test_error.

With --resume, a run with a finished record in the results file is not run again, a run
whose folder holds a checkpoint goes on from its last finished epoch (the training CLI's
--resume, with the same flags), and a run whose folder already holds its metrics gets its
record without training again. Runs too long for one sitting are started and continued
with the same command. A record or run folder that holds another configuration than the
list's line is refused before anything starts, except a larger --n-epochs: that run goes on
from its checkpoint to the new count (the training CLI's --resume with the new --n-epochs).

Before anything starts (also with --dry-run) every line's flags, the labels (each names a
folder in --out-dir), the numbers and the paths are checked; what would fail is refused in
one line, exit status 2. A sweep holds --out-dir and --results for its lifetime (flock, as
the training CLI holds a run folder): a second sweep on either is refused at once.

Faults: when a worker dies during a run, the scheduler gives the task to another worker,
which continues the run from its checkpoint if the run folder is on storage both can reach
(else it starts again); a run whose workers died more often than the scheduler's
distributed.scheduler.allowed-failures (3 unless set) is recorded as failed. A run that
fails by itself is recorded as failed and not tried again. Ctrl-C or SIGTERM stops the
trainings (each keeps its checkpoint), records every run without a record as interrupted,
and exits 130; a scheduler or cluster that goes away mid-sweep does the same, exit status 1.
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import importlib.util
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

import ff_runs

# the repository root (experiments/sweeps/sweep.py is two folders down): the training scripts
# are there, and the refit runs there as a module of the experiments package
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONNECT_SECONDS = 3    # an unreachable --scheduler is reported after this long
POLL_SECONDS = 1       # how often a training task asks whether the sweep was stopped
GRACE_SECONDS = 10     # a stopped training gets this long after SIGINT, then SIGKILL
PROGRESS_SECONDS = 60  # a progress line at least this often, even when nothing changed


# -----------------------------------------------------------------------------
# The sweep list

Run = namedtuple("Run", "label args line")  # a line of the sweep list

# a label names the run's folder and log in --out-dir: a plain name, never a path
LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\Z")


def read_text(path, what):
    """The text of a file the sweep reads; SettingsError in one line naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ff_runs.SettingsError(f"cannot read {what} {path} ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ff_runs.SettingsError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                               f"is it {what}?") from None


def read_configs(path):
    """[Run]; a line `base ARGS...` sets flags that every later line starts from (a later flag
    overrides, as argparse keeps the last occurrence). A list the sweep would misread raises
    SettingsError naming the line."""
    if "backprop" in os.path.basename(path).lower():  # its flags would parse as FF flags
        raise ff_runs.SettingsError(
            f"{path} is a backprop list (lines of experiments/baselines/backprop_baseline.py "
            f"flags), not FF runs: run it with experiments/baselines/run_backprop_list.sh "
            f"{path} RESULTS [LOGDIR]")
    runs, base, seen = [], [], {}
    for n, line in enumerate(read_text(path, "the sweep list").split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            label, *args = shlex.split(line)
        except ValueError as e:  # an unbalanced quote
            raise ff_runs.SettingsError(f"{path}:{n}: {e}") from None
        if any(a.split("=")[0] in ("--out", "--resume") for a in args):
            raise ff_runs.SettingsError(f"{path}:{n}: the sweep sets --out and --resume itself")
        if label == "base":
            base = args
            continue
        if not LABEL.match(label) or ".." in label:
            raise ff_runs.SettingsError(
                f"{path}:{n} ({label}): a label names its run folder in --out-dir: letters, "
                "digits and _ . + - only, not starting with . + - (no path)")
        if label in seen:
            raise ff_runs.SettingsError(f"{path}:{n}: label {label} repeats line {seen[label]}")
        seen[label] = n
        runs.append(Run(label, base + args, n))
    if not runs:
        raise ff_runs.SettingsError(f"no runs in {path}")
    return runs


def where(path, run):
    return f"{path}:{run.line} ({run.label})"


class LineError(ff_runs.SettingsError):
    """A list line's flags that the training CLI refuses, already prefixed with the line."""


def line_script(args, prefix):
    """(script, flags): the experiment script that runs a list line's flags, written for
    the one trainer the scripts were split from, and the flags to give it
    (ff_runs.script_for); LineError `prefix: what is wrong` where no script runs them."""
    try:
        return ff_runs.script_for(args)
    except ValueError as e:
        raise LineError(f"{prefix}: {e}") from None


def line_parser(prefix, config_class):
    """The parser of the training script of config_class, whose errors raise LineError
    `prefix: what is wrong` rather than printing the trainer's usage under this script's
    name."""
    parser = ff_runs.build_parser(config_class)
    parser.prog = config_class.SCRIPT  # what a flag of another script names

    def refuse(message):
        if "it belongs to ff_label_mnist.py" in message:
            message += " (a list line runs it with --negatives label)"
        raise LineError(f"{prefix}: {message}")
    parser.error = refuse
    return parser


def flags_config(args, prefix, defaults=None):
    """The configuration (of its script's class) of a line's training flags, checked as
    that script's CLI checks them; defaults: fields that flags not given take instead of
    the class's."""
    script, flags = line_script(args, prefix)
    config_class = ff_runs.config_class(script)
    parser = line_parser(prefix, config_class)
    given = parser.parse_args(flags)
    try:
        return config_class(**{**(defaults or {}), **{name: getattr(given, name)
                                                      for name in ff_runs.flags_given(given)}})
    except ValueError as e:
        parser.error(str(e))


def record_config(record):
    """The configuration a finished record's run had, or None where today's training CLI
    cannot read it: the record's config (its run's args.json), else, in a record written
    before records held it, its args read as the training CLI reads a run saved before the
    converged head (ff_runs.run_config): with the SGD head unless they name one."""
    try:
        if isinstance(record.get("config"), dict):
            return ff_runs.run_config(record["config"])
        return flags_config(record["args"], "", defaults={"head": "sgd"})
    except (LineError, TypeError, ValueError):
        return None


def difference(stored, wanted):
    """(field, stored value, wanted value) of the first field where two configurations
    differ, --n-epochs last (the one a resumed run may change); None where none does.
    Configurations of two scripts differ first in ("script", stored's, wanted's)."""
    if type(stored) is not type(wanted):
        return "script", stored.SCRIPT, wanted.SCRIPT
    for name in sorted(type(wanted).__dataclass_fields__, key=lambda name: name == "n_epochs"):
        have, want = getattr(stored, name), getattr(wanted, name)
        if have != want:
            return name, have, want
    return None


def held_and_listed(name, have, want):
    """`X, the list says Y` of a difference, for `... holds X, the list says Y`."""
    if name == "script":
        return f"a run of {have}, the list's line runs {want}"
    return f"{ff_runs.flag(name)} {ff_runs.shown(have)}, the list says {ff_runs.shown(want)}"


# -----------------------------------------------------------------------------
# On a worker: one configuration, trained in a subprocess. Run with `python3 -m`, this module
# is `__main__` and its functions reach the workers by value (cloudpickle sends what
# `__main__` defines), so these use no module of this repository; imported, they reach only
# workers that can import it.

# Started as `python -c LAUNCH WORKER_PID ARGS...`: the training dies with the worker that
# started it, even one killed by SIGKILL, takes SIGINT as Ctrl-C even where the worker
# ignores it, then becomes `python ARGS...` (a script and its flags, or -m MODULE and its).
LAUNCH = """\
import ctypes, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux only)
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[1]):  # the worker died before prctl took hold
    sys.exit(1)
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def run_stoppable(cmd, out, err, env, stopped, cwd=None):
    """(exit status, whether stopped() ended it) of `python ARGS...` (cmd: a script and its
    flags, or -m MODULE and its), run in cwd in a process group of its own. Once stopped()
    is true it gets SIGINT (the training CLI keeps its last checkpoint and exits 130), and
    SIGKILL if still there GRACE_SECONDS later."""
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(os.getpid()), *cmd], stdout=out,
                            stderr=err, env=env, cwd=cwd, start_new_session=True)
    try:
        while True:
            try:
                return proc.wait(POLL_SECONDS), False
            except subprocess.TimeoutExpired:
                if stopped():
                    break
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return proc.returncode, True
    finally:
        if proc.poll() is None:  # this task itself failed: leave no training behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def stop_requested(event):
    try:
        return event.is_set()
    except Exception:  # the scheduler out of reach for a moment: train on
        return False


def attempts_in(log_path, header):
    """How many attempts of this sweep the run's log shows."""
    if not os.path.exists(log_path):
        return 0
    with open(log_path, errors="replace") as f:
        return sum(line.startswith(header) for line in f)


def refit(run_dir, job, env, log, stopped):
    """The refit_* fields of the record: the run's head refitted on its top K layers."""
    with open(os.path.join(run_dir, "args.json")) as f:
        run_args = json.load(f)
    head = run_args.get("head", "sgd")  # a run saved before the converged head had SGD's
    cmd = [*job.refit_command, "--run", run_dir, "--top-k", str(job.refit_top_k),
           "--seed", str(run_args["seed"]), "--head", head]
    if head == "sgd":
        cmd += ["--softmax-epochs", str(run_args["softmax_epochs"]),
                "--softmax-lr", str(run_args["softmax_lr"]),
                "--softmax-weight-decay", str(run_args["softmax_weight_decay"])]
    with tempfile.TemporaryFile("w+") as out:
        rc, _ = run_stoppable(cmd, out, log, env, stopped, cwd=job.root)  # -m: from the root
        out.seek(0)
        lines = out.read().strip().splitlines()
    fields = {"refit_rc": rc}
    if rc == 0:
        result = json.loads(lines[-1])
        fields.update(refit_top_k=job.refit_top_k, refit_test_error=result["test_error"],
                      refit_val_error=result["val_error"])
    return fields


def train_on_worker(label, args, script, flags, job, extend_to=None):
    """The record of one configuration, trained on this worker with its own run folder and
    log: the list line's args, run as `script flags` (see line_script). A log that already
    shows an attempt of this sweep means a worker died while running it: the run goes on
    from its checkpoint (the folder is shared) or, without one, afresh. extend_to: the list's
    --n-epochs, larger than the run folder's (see plan): the run goes on from its checkpoint
    to it, and a metrics.json there is the shorter run's."""
    from distributed import Event, get_worker
    record = {"label": label, "args": args, "script": script, "rc": None, "commit": job.commit}
    stop = Event(job.stop_event)
    stopped = lambda: stop_requested(stop)  # noqa: E731
    if time.time() > job.deadline:
        return {**record, "status": "not started"}
    if stopped():
        return {**record, "status": "interrupted"}
    worker = get_worker()
    run_dir = os.path.join(job.out_dir, label)
    log_path = run_dir + ".log"
    header = f"--- sweep {job.token}, attempt "
    attempt = attempts_in(log_path, header) + 1
    go_on = job.resume or attempt > 1
    finished = os.path.exists(os.path.join(run_dir, "metrics.json")) and not extend_to
    resumed = go_on and not finished and os.path.exists(os.path.join(run_dir, "checkpoint.npz"))
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(job.threads), OMP_NUM_THREADS=str(job.threads),
               MKL_NUM_THREADS=str(job.threads), PYTHONUNBUFFERED="1")
    t0 = time.time()
    os.makedirs(job.out_dir, exist_ok=True)
    with open(log_path, "a" if go_on else "w") as log:
        if go_on and finished:  # it ended, but the sweep stopped before writing its record
            rc, interrupted, wall = 0, False, None  # wall-clock unknown: it ran earlier
        else:
            worker.log_event(job.topic, label)  # the client counts it as running
            log.write(f"{header}{attempt} on {worker.address}, commit {job.commit}"
                      f"{', resumed from its checkpoint' if resumed else ''} ---\n")
            log.flush()
            # --n-epochs given again: without it --resume goes on to the run's own count
            more = ["--n-epochs", str(extend_to)] if extend_to else []
            cmd = [job.train_scripts[script], *flags, *more,
                   "--resume" if resumed else "--out", run_dir]
            rc, interrupted = run_stoppable(cmd, log, subprocess.STDOUT, env, stopped)
            wall = time.time() - t0
        record.update(rc=rc, wall_seconds=wall, status="finished" if rc == 0 else
                      "interrupted" if interrupted else "failed", threads=job.threads,
                      resumed=bool(resumed), attempts=attempt, worker=worker.address)
        if rc == 0:
            with open(os.path.join(run_dir, "metrics.json")) as f:
                record["metrics"] = json.load(f)
            with open(os.path.join(run_dir, "args.json")) as f:  # what --resume compares
                record["config"] = json.load(f)
            with open(os.path.join(run_dir, "history.json")) as f:
                record["environment"] = json.load(f)["environment"]
            if job.refit_top_k:
                record.update(refit(run_dir, job, env, log, stopped))
    return record


def dashboard_served():
    """On the scheduler: whether it serves the dashboard, which needs bokeh."""
    return importlib.util.find_spec("bokeh") is not None


# -----------------------------------------------------------------------------
# On the client, before anything starts: the checks, --resume's plan, the locks

def check_paths(ns):
    """--out-dir a folder or one to make; --results a file in a folder that is there, or that
    the sweep makes for --out-dir (runs/x.jsonl beside runs/x)."""
    ff_runs.check_writable(ns.out_dir, "--out-dir")
    if os.path.isdir(ns.results):
        raise ff_runs.SettingsError(f"--results {ns.results} is a folder; give the path of a file")
    ff_runs.check_writable(ns.results, "--results", folder=False)
    folder, out_dir = (os.path.dirname(os.path.abspath(ns.results)), os.path.abspath(ns.out_dir))
    if not os.path.isdir(folder) and not (out_dir + os.sep).startswith(folder + os.sep):
        raise ff_runs.SettingsError(f"--results {ns.results}: its folder {folder} does not exist")


def check_sweep(ns, runs):
    """{label: configuration, of its script's class} of the runs, after refusing what would
    fail only later, or write outside --out-dir: the numbers, the paths, every line's flags
    (also under --dry-run)."""
    for name, value in (("--jobs", ns.jobs), ("--threads", ns.threads)):
        if value < 1:
            raise ff_runs.SettingsError(f"{name} {value} must be at least 1")
    if not ns.start_within >= 0:  # NaN too, which every comparison with the clock ignores
        raise ff_runs.SettingsError(f"--start-within {ns.start_within:g} must be a number of "
                               "seconds, 0 or more")
    if ns.refit_top_k < 0:
        raise ff_runs.SettingsError(f"--refit-top-k {ns.refit_top_k} must be 0 (no refit) or more")
    check_paths(ns)
    configs = {}
    for run in runs:
        cfg = configs[run.label] = flags_config(run.args, where(ns.configs, run))
        n_layers = len(cfg.layer_sizes) - 1
        if ns.refit_top_k > n_layers:
            raise ff_runs.SettingsError(f"{where(ns.configs, run)}: --refit-top-k {ns.refit_top_k} "
                                   f"exceeds the run's {n_layers} layers")
    return configs


def finished_records(path):
    """{label: [(line number, record)]} of the finished records in the results file. A line
    that is not a whole record (a sweep killed while writing it) is skipped with a warning;
    JSON that is not a record means another file, and is refused."""
    found = {}
    if not os.path.exists(path):
        return found
    for n, line in enumerate(read_text(path, "a results file").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            print(f"warning: {path}:{n} is not a whole record (cut short?); skipped",
                  file=sys.stderr)
            continue
        if not (isinstance(record, dict) and isinstance(record.get("label"), str)
                and isinstance(record.get("status"), str) and isinstance(record.get("args"), list)
                and all(isinstance(a, str) for a in record["args"])):
            raise ff_runs.SettingsError(f"{path}:{n}: not a sweep record (a JSON object with label, "
                                   "args and status); is --results a sweep's results file?")
        if record["status"] == "finished":
            found.setdefault(record["label"], []).append((n, record))
    return found


def recorded(ns, run, cfg, records):
    """Whether one of the run's finished records has the configuration of its line. Else the
    last is refused, unless its --n-epochs was smaller: the run goes on (see folder_plan)."""
    if not records:
        return False
    for n, record in records:
        stored = record_config(record)
        if stored == cfg if stored is not None else record["args"] == run.args:
            return True
    if stored is None:  # flags this training CLI no longer reads
        raise ff_runs.SettingsError(f"{where(ns.configs, run)}: {ns.results}:{n} holds the flags "
                               f"{shlex.join(record['args'])}, the list says "
                               f"{shlex.join(run.args)}")
    name, have, want = difference(stored, cfg)
    if name == "n_epochs" and want > have:
        return False
    raise ff_runs.SettingsError(f"{where(ns.configs, run)}: {ns.results}:{n} holds "
                                + held_and_listed(name, have, want))


def stored_config(run_dir):
    """The configuration a run folder holds: its checkpoint's (what --resume goes on from),
    else a finished run's args.json; None where it holds neither (the run starts afresh)."""
    if os.path.exists(os.path.join(run_dir, "checkpoint.npz")):
        return ff_runs.read_checkpoint_config(run_dir)[0]
    path = os.path.join(run_dir, "args.json")
    if not (os.path.exists(path) and os.path.exists(os.path.join(run_dir, "metrics.json"))):
        return None
    try:
        with open(path) as f:
            return ff_runs.run_config(json.load(f))
    except ff_runs.READ_ERRORS as e:
        raise ff_runs.damaged_error(path, e) from None


def folder_plan(ns, run, cfg):
    """The --n-epochs to extend the run in its folder to, or None to take it as it stands.
    A folder holding another configuration is refused (the run would mix the two), except
    one of fewer --n-epochs than the list's, with a checkpoint to go on from."""
    run_dir = os.path.join(ns.out_dir, run.label)
    stored = stored_config(run_dir)
    diff = stored and difference(stored, cfg)
    if not diff:
        return None
    name, have, want = diff
    extends = name == "n_epochs" and want > have
    if extends and os.path.exists(os.path.join(run_dir, "checkpoint.npz")):
        return want
    raise ff_runs.SettingsError(f"{where(ns.configs, run)}: run folder holds "
                                + held_and_listed(name, have, want)
                                + (" (and no checkpoint to go on from)" if extends else ""))


def plan(ns, runs, configs):
    """[(run, --n-epochs to extend it to or None)] to run. With --resume, a run recorded as
    finished with its line's configuration is left out, and a record or run folder with
    another configuration is refused here, before anything starts."""
    if not ns.resume:
        return [(run, None) for run in runs]
    records = finished_records(ns.results)
    todo = []
    for run in runs:
        if recorded(ns, run, configs[run.label], records.get(run.label)):
            print(f"{run.label:24s} finished earlier: recorded in {ns.results}", flush=True)
        else:
            todo.append((run, folder_plan(ns, run, configs[run.label])))
    return todo


def lock_file(path, what, holder):
    """An exclusive flock on the file at path (made if missing), held until release(f),
    or until the process ends however it ends; refused at once, naming the sweep that
    holds it."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            other = f.read().strip()
            f.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ff_runs.SettingsError(f"{what}: cannot lock {path} ({e.strerror or e})") from None
            raise ff_runs.SettingsError(f"{what} is in use by another sweep ({other or 'unknown'}); "
                                   f"wait for it to end or give another {what.split()[0]}")
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        f.close()  # its holder removed it as we opened it: lock the file there now
    f.seek(0)
    f.truncate()
    f.write(holder + "\n")
    f.flush()
    return f


def release(f):
    with contextlib.suppress(OSError):
        os.remove(f.name)  # while still held, so a sweep waiting on this file locks anew
    f.close()


def first_missing(path):
    """The outermost folder of path that does not exist yet (None if path exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


@contextlib.contextmanager
def sweep_locks(ns):
    """--out-dir (OUT_DIR/.sweep.lock) and --results (RESULTS.lock) locked for the sweep's
    lifetime, as the training CLI locks a run folder: a second sweep on either would train
    in the same folders and append to the same file. Folders made for --out-dir that are
    still empty at the end (the scheduler was out of reach) are removed."""
    holder = (f"process {os.getpid()}, the sweep of {ns.configs}, since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    made, out_dir = first_missing(ns.out_dir), os.path.abspath(ns.out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ff_runs.SettingsError(f"--out-dir {ns.out_dir}: {e.strerror or e}") from None
    locks = []
    try:
        locks.append(lock_file(os.path.join(out_dir, ".sweep.lock"), f"--out-dir {ns.out_dir}",
                               holder))
        locks.append(lock_file(ns.results + ".lock", f"--results {ns.results}", holder))
        yield
    finally:
        for f in reversed(locks):
            release(f)
        folder = out_dir
        while made and folder != os.path.dirname(made):
            try:
                os.rmdir(folder)
            except OSError:  # not empty: the sweep's
                break
            folder = os.path.dirname(folder)


# -----------------------------------------------------------------------------
# On the client: the cluster, the results file, progress, Ctrl-C

class ClusterLost(Exception):
    """The scheduler or the cluster went away mid-sweep."""


# what the client raises for tasks the cluster dropped (the scheduler out of reach)
CANCELLED = (concurrent.futures.CancelledError, asyncio.CancelledError)


def open_results(path):
    """The results file, open for appending; a last line cut short gets its newline, so
    that the next record starts a line of its own."""
    if os.path.isdir(path):
        raise ff_runs.SettingsError(f"--results {path} is a folder; give the path of a file")
    try:
        results = open(path, "a")
    except OSError as e:
        raise ff_runs.SettingsError(f"--results {path}: cannot append to it ({e.strerror or e})") from None
    if results.tell() > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                results.write("\n")
    return results


def write_record(results, record):
    results.write(json.dumps(record) + "\n")
    results.flush()
    os.fsync(results.fileno())  # a client killed right after loses nothing recorded


def connect(ns):
    """(client, cluster): a LocalCluster of --jobs single-threaded worker processes on this
    machine, or (client, None) for the cluster at --scheduler."""
    from distributed import Client, LocalCluster
    if ns.scheduler:
        try:
            return Client(ns.scheduler, timeout=CONNECT_SECONDS), None
        except (OSError, TimeoutError, ValueError) as e:
            raise ff_runs.SettingsError(f"cannot reach the scheduler at {ns.scheduler} ({e})") from None
    # the workers start with SIGINT ignored: Ctrl-C at a terminal reaches the whole process
    # group, and the sweep, not each worker, decides what stops
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cluster = LocalCluster(n_workers=ns.jobs, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address="127.0.0.1:0")
    finally:
        signal.signal(signal.SIGINT, handler)
    return Client(cluster), cluster


def free_threads(client, busy):
    """Threads of the cluster's workers (as many as join) less the runs handed out."""
    try:
        return sum(client.nthreads().values()) - busy
    except (OSError, *CANCELLED) as e:
        raise ClusterLost(f"no answer from the scheduler: {type(e).__name__}") from None


@contextlib.contextmanager
def quiet_distributed():
    """distributed's log lines held back: a client whose scheduler went away logs its
    failed reconnection and tracebacks as it closes, after the sweep said so in one line."""
    loggers = [logging.getLogger(name) for name in ["distributed"] + list(
        logging.root.manager.loggerDict) if name.startswith("distributed")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def why_cancelled(e):
    """One line: why the client dropped the tasks."""
    groups = getattr(e, "error_groups", None)
    reasons = ({g.reason for g in groups} if groups else {getattr(e, "reason", None) or str(e)})
    return " ".join(", ".join(sorted(r for r in reasons if r) or [type(e).__name__]).split())


def no_result(run, job):
    """The record of a run whose task gave none, before its status."""
    return {"label": run.label, "args": run.args, "script": ff_runs.script_for(run.args)[0],
            "rc": None, "commit": job.commit}


def outcome(future, run, job):
    """The record of an ended task: its own, or one that says why the cluster has none."""
    if future.status == "finished":
        return future.result()
    record = no_result(run, job)
    if future.status == "cancelled":
        return {**record, "status": "interrupted"}
    error = future.exception()
    return {**record, "status": "failed",
            "reason": " ".join(f"{type(error).__name__}: {error}".split())}


def report(record, refit_top_k):
    label, status = f"{record['label']:24s}", record["status"]
    if status == "not started":
        print(f"{label} not started: past --start-within", flush=True)
        return
    if "reason" in record:
        print(f"{label} {status}: {record['reason']}", flush=True)
        return
    rc, wall = record["rc"], record.get("wall_seconds")
    metrics = record.get("metrics", {})  # a head's errors, else the goodness read-out's
    err = metrics.get("test_error", metrics.get("goodness_test_error"))
    val = metrics.get("val_error", metrics.get("goodness_val_error"))
    print(f"{label} rc {rc}  "
          + ("" if wall is None else f"{wall:7.1f} s  ")
          + (f"val error {100 * val:.2f}%  " if val is not None else "")
          + f"test error {'-' if err is None else f'{100 * err:.2f}%'}"
          + (f"  top-{refit_top_k} {100 * record['refit_test_error']:.2f}%"
             if "refit_test_error" in record else "")
          + (f"  ({status})" if status != "finished" else ""), flush=True)


def collect(client, todo, job, results):
    """Hands each (run, extend_to) of todo to the cluster as a worker thread comes free, in
    list order, writes each record as its task ends and prints the progress. On SIGINT or
    SIGTERM stops the tasks and raises RunInterrupted; so too, exit status 1, when the
    scheduler or the cluster goes away.

    Why not submit every run at once: the scheduler holds a task back until a thread is
    free only when its group (its key's name) is larger than twice the cluster's threads;
    each run's key makes a small group, so every run would be placed on a worker at once,
    behind that worker's runs, and could reach a worker that came free only by work
    stealing, which moves it only if its duration guess (by the label's stem) says so: a
    worker stood idle for minutes with nine runs queued elsewhere."""
    from distributed import Event, wait
    started, ended = set(), set()
    client.subscribe_topic(job.topic, lambda event: started.add(event[1]))
    waiting, futures, pending = list(todo), {}, set()
    signals, lost = [], None
    handlers = {s: signal.signal(s, lambda signum, frame: signals.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    t0, shown = time.time(), (None, 0)
    try:
        try:
            while (pending or waiting) and not signals:
                for _ in range(min(len(waiting), free_threads(client, len(pending))
                                   if waiting else 0)):
                    run, extend_to = waiting.pop(0)
                    future = client.submit(train_on_worker, run.label, run.args,
                                           *ff_runs.script_for(run.args), job, extend_to,
                                           key=f"{run.label}-{job.token}", pure=False)
                    futures[future] = run
                    pending.add(future)
                done = ()
                if not pending:  # no worker yet (or none left): wait for one to join
                    time.sleep(POLL_SECONDS)
                else:
                    try:
                        done, pending = wait(pending, timeout=POLL_SECONDS,
                                             return_when="FIRST_COMPLETED")
                    except TimeoutError:
                        pass
                for future in done:
                    record = outcome(future, futures[future], job)
                    write_record(results, record)
                    report(record, job.refit_top_k)
                    ended.add(record["label"])
                running = len(started - ended)
                counts = (len(ended), running, len(todo) - len(ended) - running)
                if counts != shown[0] or time.time() - shown[1] > PROGRESS_SECONDS:
                    elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - t0))
                    print(f"[{elapsed}] %d ended, %d running, %d queued" % counts, flush=True)
                    shown = (counts, time.time())
        except (ClusterLost, *CANCELLED) as e:
            lost = why_cancelled(e)
        if not pending and not waiting:
            return 0
        if lost is None:  # stopped: queued tasks are cancelled, running ones stop their training
            Event(job.stop_event, client=client).set()
            running = {f for f in pending if futures[f].label in started}
            client.cancel(list(pending - running))
            with contextlib.suppress(TimeoutError, *CANCELLED):
                wait(running, timeout=GRACE_SECONDS + 2 * POLL_SECONDS)
        interrupted = 0
        left = [(futures[f], f) for f in pending] + [(run, None) for run, _ in waiting]
        for run, future in sorted(left, key=lambda pair: pair[0].line):
            # a lost scheduler cannot hand over a result: a run that ended meanwhile is
            # recorded from its folder by --resume
            record = (outcome(future, run, job)
                      if lost is None and future is not None and future.status == "finished" else
                      {**no_result(run, job), "status": "interrupted"})
            write_record(results, record)
            report(record, job.refit_top_k)
            interrupted += record["status"] == "interrupted"
        kept = (f"{interrupted} runs recorded as interrupted, with their checkpoints kept: the "
                "same command with --resume goes on")
        if lost is not None:
            raise ff_runs.RunInterrupted(f"the scheduler or the cluster went away ({lost}); {kept}", 1)
        raise ff_runs.RunInterrupted(f"interrupted by {signal.Signals(signals[0]).name}; {kept}")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def check_configs(runs, configs, ns):
    """--dry-run: every run's flags and folder, checked by the training CLI as the sweep
    would start it."""
    for run, extend_to in plan(ns, runs, configs):
        run_dir = os.path.join(ns.out_dir, run.label)
        go_on = ns.resume and os.path.exists(os.path.join(run_dir, "checkpoint.npz"))
        if ns.resume and not extend_to and os.path.exists(os.path.join(run_dir, "metrics.json")):
            print(f"{run.label:24s} ok: finished in its folder, recorded without training")
            continue
        more = ["--n-epochs", str(extend_to)] if extend_to else []
        prefix = where(ns.configs, run)
        script, flags = line_script(run.args, prefix)
        try:
            ff_runs.parse_args(flags + more + ["--resume" if go_on else "--out", run_dir],
                               parser=line_parser(prefix, ff_runs.config_class(script)))
        except LineError:
            raise
        except ff_runs.SettingsError as e:  # the run's folder, memory, GPU
            raise ff_runs.SettingsError(f"{prefix}: {e}") from None
        print(f"{run.label:24s} ok: {script} {shlex.join(flags)}"
              + (f"  (goes on from its checkpoint to --n-epochs {extend_to})" if more else ""))
    return 0


def make_job(ns):
    """What each task of the sweep is sent with."""
    token = os.urandom(4).hex()  # names this sweep's tasks, event and log lines
    return argparse.Namespace(
        out_dir=os.path.abspath(ns.out_dir),  # the same path on every worker
        threads=ns.threads, resume=ns.resume, refit_top_k=ns.refit_top_k,
        commit=ff_runs.code_commit(), deadline=time.time() + ns.start_within, token=token,
        topic=f"ff-sweep-{token}", stop_event=f"ff-sweep-stop-{token}",
        train_scripts={script: os.path.join(ROOT, script) for script in ff_runs.SCRIPTS},
        root=ROOT, refit_command=["-m", "experiments.analyses.refit_head"])


def run_sweep(ns):
    runs = read_configs(ns.configs)
    configs = check_sweep(ns, runs)
    if ns.dry_run:
        return check_configs(runs, configs, ns)
    with sweep_locks(ns):
        todo = plan(ns, runs, configs)
        if not todo:
            return 0
        job = make_job(ns)
        client, cluster = connect(ns)
        try:
            with open_results(ns.results) as results:
                n_workers = len(client.scheduler_info()["workers"]) if ns.scheduler else ns.jobs
                place = (f"the cluster at {ns.scheduler} ({n_workers} workers now)"
                         if ns.scheduler else f"{n_workers} local worker processes")
                print(f"{len(todo)} runs on {place}, {ns.threads} BLAS threads each", flush=True)
                if client.run_on_scheduler(dashboard_served):
                    print(f"dashboard: {client.dashboard_link}", flush=True)
                return collect(client, todo, job, results)
        finally:
            with quiet_distributed():
                client.close()
                if cluster is not None:
                    cluster.close()


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("configs", help="file of lines: label, then training flags")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes of the local cluster: runs at once (not with --scheduler)")
    p.add_argument("--threads", type=int, default=2, help="BLAS threads per run")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="run on the Dask cluster of this scheduler instead of a local one")
    p.add_argument("--out-dir", required=True,
                   help="folder of the run folders and logs (on a cluster: reachable by every worker)")
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
    return ff_runs.exit_status(lambda: run_sweep(ns))


if __name__ == "__main__":
    sys.exit(main())
