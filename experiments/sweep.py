"""Run many training configurations on a Dask cluster and collect their results in one file.

Each line of the sweep list is a label and the training CLI's arguments; blank lines and
lines starting with '#' are skipped. Each configuration is one task of a `dask.distributed`
cluster: by default a LocalCluster on this machine of --jobs worker processes with one
thread each, or the cluster at --scheduler. A task trains in a subprocess on its worker with
its own run folder and log and --threads BLAS threads, and returns its record; the client
appends each record to the results file (JSON lines) as its task ends, so a sweep that is
stopped keeps what finished. docs/sweeps.md shows the cluster setups.

    python3 experiments/sweep.py experiments/sweep_small.txt --jobs 8 --threads 2 \
        --out-dir runs/sweep-small --results runs/sweep-small.jsonl

With --refit-top-k K, each finished run's head is also refitted on its top K layers
(same head settings as the run), and that test error is stored as refit_test_error.

With --resume, a run with a finished record in the results file is not run again, a run
whose folder holds a checkpoint goes on from its last finished epoch (the training CLI's
--resume, with the same flags), and a run whose folder already holds its metrics gets its
record without training again. Runs too long for one sitting are started and continued
with the same command.

Faults: when a worker dies during a run, the scheduler gives the task to another worker,
which continues the run from its checkpoint if the run folder is on storage both can reach
(else it starts again); a run whose workers died more often than the scheduler's
distributed.scheduler.allowed-failures (3 unless set) is recorded as failed. A run that
fails by itself is recorded as failed and not tried again. Ctrl-C or SIGTERM stops the
trainings (each keeps its checkpoint), records every run without a record as interrupted,
and exits 130.
"""

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import ff_hybrid_mnist as ff  # noqa: E402

CONNECT_SECONDS = 3    # an unreachable --scheduler is reported after this long
POLL_SECONDS = 1       # how often a training task asks whether the sweep was stopped
GRACE_SECONDS = 10     # a stopped training gets this long after SIGINT, then SIGKILL
PROGRESS_SECONDS = 60  # a progress line at least this often, even when nothing changed


# -----------------------------------------------------------------------------
# The sweep list

def read_configs(path):
    """[(label, args)]; a line `base ARGS...` sets flags that every later line starts from
    (a later flag overrides, as argparse keeps the last occurrence). A list the sweep would
    misread raises SettingsError naming the line."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        raise ff.SettingsError(f"cannot read the sweep list {path} ({e.strerror or e})") from None
    configs, base, seen = [], [], {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            label, *args = shlex.split(line)
        except ValueError as e:  # an unbalanced quote
            raise ff.SettingsError(f"{path}:{n}: {e}") from None
        if any(a.split("=")[0] in ("--out", "--resume") for a in args):
            raise ff.SettingsError(f"{path}:{n}: the sweep sets --out and --resume itself")
        if label == "base":
            base = args
            continue
        if label in seen:
            raise ff.SettingsError(f"{path}:{n}: label {label} repeats line {seen[label]}")
        seen[label] = n
        configs.append((label, base + args))
    return configs


# -----------------------------------------------------------------------------
# On a worker: one configuration, trained in a subprocess. Run as a script, this file's
# functions reach the workers by value (cloudpickle sends what `__main__` defines), so these
# use no module of this repository; imported, they reach only workers that can import it.

# Started as `python -c LAUNCH WORKER_PID SCRIPT ARGS...`: the training dies with the worker
# that started it, even one killed by SIGKILL, takes SIGINT as Ctrl-C even where the worker
# ignores it, then becomes SCRIPT.
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


def run_stoppable(cmd, out, err, env, stopped):
    """(exit status, whether stopped() ended it) of `python SCRIPT ARGS...` (cmd), run in a
    process group of its own. Once stopped() is true it gets SIGINT (the training CLI keeps
    its last checkpoint and exits 130), and SIGKILL if still there GRACE_SECONDS later."""
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(os.getpid()), *cmd], stdout=out,
                            stderr=err, env=env, start_new_session=True)
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
    cmd = [job.refit_script, "--run", run_dir, "--top-k", str(job.refit_top_k),
           "--seed", str(run_args["seed"]), "--head", head]
    if head == "sgd":
        cmd += ["--softmax-epochs", str(run_args["softmax_epochs"]),
                "--softmax-lr", str(run_args["softmax_lr"]),
                "--softmax-weight-decay", str(run_args["softmax_weight_decay"])]
    with tempfile.TemporaryFile("w+") as out:
        rc, _ = run_stoppable(cmd, out, log, env, stopped)
        out.seek(0)
        lines = out.read().strip().splitlines()
    fields = {"refit_rc": rc}
    if rc == 0:
        result = json.loads(lines[-1])
        fields.update(refit_top_k=job.refit_top_k, refit_test_error=result["test_error"],
                      refit_val_error=result["val_error"])
    return fields


def train_on_worker(label, args, job):
    """The record of one configuration, trained on this worker with its own run folder and
    log. A log that already shows an attempt of this sweep means a worker died while running
    it: the run goes on from its checkpoint (the folder is shared) or, without one, afresh."""
    from distributed import Event, get_worker
    record = {"label": label, "args": args, "rc": None, "commit": job.commit}
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
    finished = os.path.exists(os.path.join(run_dir, "metrics.json"))
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
            cmd = [job.train_script, *args, "--resume" if resumed else "--out", run_dir]
            rc, interrupted = run_stoppable(cmd, log, subprocess.STDOUT, env, stopped)
            wall = time.time() - t0
        record.update(rc=rc, wall_seconds=wall, status="finished" if rc == 0 else
                      "interrupted" if interrupted else "failed", threads=job.threads,
                      resumed=bool(resumed), attempts=attempt, worker=worker.address)
        if rc == 0:
            with open(os.path.join(run_dir, "metrics.json")) as f:
                record["metrics"] = json.load(f)
            with open(os.path.join(run_dir, "history.json")) as f:
                record["environment"] = json.load(f)["environment"]
            if job.refit_top_k:
                record.update(refit(run_dir, job, env, log, stopped))
    return record


def dashboard_served():
    """On the scheduler: whether it serves the dashboard, which needs bokeh."""
    return importlib.util.find_spec("bokeh") is not None


# -----------------------------------------------------------------------------
# On the client: the cluster, the results file, progress, Ctrl-C

def finished_labels(path):
    """Labels with a finished record in the results file. A line that is not a whole
    record (a sweep killed while writing it) is skipped with a warning."""
    labels = set()
    if not os.path.exists(path):
        return labels
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                print(f"warning: {path}:{n} is not a whole record (cut short?); skipped",
                      file=sys.stderr)
                continue
            if record.get("status") == "finished":
                labels.add(record["label"])
    return labels


def open_results(path):
    """The results file, open for appending; a last line cut short gets its newline, so
    that the next record starts a line of its own."""
    if os.path.isdir(path):
        raise ff.SettingsError(f"--results {path} is a folder; give the path of a file")
    try:
        results = open(path, "a")
    except OSError as e:
        raise ff.SettingsError(f"--results {path}: cannot append to it ({e.strerror or e})") from None
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
    import dask
    from distributed import Client, LocalCluster
    if ns.scheduler:
        try:
            return Client(ns.scheduler, timeout=CONNECT_SECONDS), None
        except (OSError, TimeoutError, ValueError) as e:
            raise ff.SettingsError(f"cannot reach the scheduler at {ns.scheduler} ({e})") from None
    # the workers start with SIGINT ignored: Ctrl-C at a terminal reaches the whole process
    # group, and the sweep, not each worker, decides what stops
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # a saturation of 1: a worker is given a run only when its one thread is free.
        # Dask's default 1.1 gives a single-threaded worker two, and a short run could then
        # wait behind a long one while another worker stood idle (seen in a sweep here)
        with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
            cluster = LocalCluster(n_workers=ns.jobs, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address="127.0.0.1:0")
    finally:
        signal.signal(signal.SIGINT, handler)
    return Client(cluster), cluster


def outcome(future, label, args, job):
    """The record of an ended task: its own, or one that says why the cluster has none."""
    if future.status == "finished":
        return future.result()
    record = {"label": label, "args": args, "rc": None, "commit": job.commit}
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
    err = record.get("metrics", {}).get("test_error")
    val = record.get("metrics", {}).get("val_error")
    print(f"{label} rc {rc}  "
          + ("" if wall is None else f"{wall:7.1f} s  ")
          + (f"val error {100 * val:.2f}%  " if val is not None else "")
          + f"test error {'-' if err is None else f'{100 * err:.2f}%'}"
          + (f"  top-{refit_top_k} {100 * record['refit_test_error']:.2f}%"
             if "refit_test_error" in record else "")
          + (f"  ({status})" if status != "finished" else ""), flush=True)


def collect(client, todo, job, results):
    """Submits one task a configuration, writes each record as its task ends and prints the
    progress; on SIGINT or SIGTERM stops the tasks and raises RunInterrupted."""
    from distributed import Event, wait
    started, ended = set(), set()
    client.subscribe_topic(job.topic, lambda event: started.add(event[1]))
    futures = {client.submit(train_on_worker, label, args, job, key=f"{label}-{job.token}",
                             pure=False): (label, args) for label, args in todo}
    pending = set(futures)
    signals = []
    handlers = {s: signal.signal(s, lambda signum, frame: signals.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    t0, shown = time.time(), (None, 0)
    try:
        while pending and not signals:
            try:
                done, pending = wait(pending, timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = ()
            for future in done:
                record = outcome(future, *futures[future], job)
                write_record(results, record)
                report(record, job.refit_top_k)
                ended.add(record["label"])
            running = len(started - ended)
            counts = (len(ended), running, len(todo) - len(ended) - running)
            if counts != shown[0] or time.time() - shown[1] > PROGRESS_SECONDS:
                elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - t0))
                print(f"[{elapsed}] %d ended, %d running, %d queued" % counts, flush=True)
                shown = (counts, time.time())
        if not pending:
            return 0
        # stopped: queued tasks are cancelled, running ones stop their training
        Event(job.stop_event, client=client).set()
        running = {f for f in pending if futures[f][0] in started}
        client.cancel(list(pending - running))
        try:
            wait(running, timeout=GRACE_SECONDS + 2 * POLL_SECONDS)
        except TimeoutError:
            pass
        interrupted = 0
        for future in pending:
            label, args = futures[future]
            record = (outcome(future, label, args, job) if future.status == "finished" else
                      {"label": label, "args": args, "rc": None, "commit": job.commit,
                       "status": "interrupted"})
            write_record(results, record)
            report(record, job.refit_top_k)
            interrupted += record["status"] == "interrupted"
        raise ff.RunInterrupted(
            f"interrupted by {signal.Signals(signals[0]).name}; {interrupted} runs recorded as "
            "interrupted, with their checkpoints kept: the same command with --resume goes on")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def check_configs(configs, ns):
    """--dry-run: every run's flags and folder, checked by the training CLI."""
    for label, args in configs:
        run_dir = os.path.join(ns.out_dir, label)
        go_on = ns.resume and os.path.exists(os.path.join(run_dir, "checkpoint.npz"))
        ff.parse_args(args + ["--resume" if go_on else "--out", run_dir])
        print(f"{label:24s} ok: {shlex.join(args)}")
    return 0


def run_sweep(ns):
    configs = read_configs(ns.configs)
    if os.path.isdir(ns.results):
        raise ff.SettingsError(f"--results {ns.results} is a folder; give the path of a file")
    if ns.dry_run:
        return check_configs(configs, ns)
    recorded = finished_labels(ns.results) if ns.resume else set()
    todo = [(label, args) for label, args in configs if label not in recorded]
    for label, _ in configs:
        if label in recorded:
            print(f"{label:24s} finished earlier: recorded in {ns.results}", flush=True)
    if not todo:
        return 0
    token = os.urandom(4).hex()  # names this sweep's tasks, event and log lines
    job = argparse.Namespace(
        out_dir=os.path.abspath(ns.out_dir),  # the same path on every worker
        threads=ns.threads, resume=ns.resume, refit_top_k=ns.refit_top_k,
        commit=ff.code_commit(), deadline=time.time() + ns.start_within, token=token,
        topic=f"ff-sweep-{token}", stop_event=f"ff-sweep-stop-{token}",
        train_script=os.path.join(ROOT, "ff_hybrid_mnist.py"),
        refit_script=os.path.join(HERE, "refit_head.py"))
    client, cluster = connect(ns)
    try:
        with open_results(ns.results) as results:
            try:
                os.makedirs(job.out_dir, exist_ok=True)
            except OSError as e:
                raise ff.SettingsError(f"--out-dir {ns.out_dir}: {e.strerror or e}") from None
            where = (f"the cluster at {ns.scheduler} ({len(client.scheduler_info()['workers'])} "
                     "workers now)" if ns.scheduler else f"{ns.jobs} local worker processes")
            print(f"{len(todo)} runs on {where}, {ns.threads} BLAS threads each", flush=True)
            if client.run_on_scheduler(dashboard_served):
                print(f"dashboard: {client.dashboard_link}", flush=True)
            return collect(client, todo, job, results)
    finally:
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
    if ns.jobs < 1 or ns.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    return ff.exit_status(lambda: run_sweep(ns))


if __name__ == "__main__":
    sys.exit(main())
