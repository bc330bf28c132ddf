"""The sweep runner: each configuration is a task of a Dask cluster (a LocalCluster by
default, or one given by --scheduler), its record lands in the results file once, a worker
killed mid-run is survived, Ctrl-C leaves no training behind, and lists or paths it would
misread are refused with one line. Real processes on 127.0.0.1 only; every process a test
starts is killed at its end, with whatever it started."""
import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import ff_runs
from conftest import TINY_LINE, one_line
from experiments.sweeps import plot_threshold_sweep, sweep

# about 1.2 s of training in 12 epochs of 0.1 s: time to kill what runs it
SLOW = "--layer-sizes 784,200,200 --n-epochs 12 --n-train 2000 --batch-size 50 --softmax-epochs 1 --top-k 1"
# the sweep as the docs run it: a module, from the repository root (cwd=ROOT)
SWEEP = [sys.executable, "-m", "experiments.sweeps.sweep"]
LISTS_DIR = os.path.join(ROOT, "experiments", "sweeps", "lists")

# a stand-in for the training CLI that sleeps --sleep S seconds and writes what a run's
# record reads, its start and end times as its metrics: runs of known length, no CPU
SLEEPER = """\
import json, os, sys, time
args = sys.argv[1:]
out = args[args.index("--out") + 1]
os.makedirs(out, exist_ok=True)
start = time.time()
time.sleep(float(args[args.index("--sleep") + 1]))
for name, data in (("args.json", {}), ("history.json", {"environment": {}}),
                   ("metrics.json", {"start": start, "end": time.time()})):
    with open(os.path.join(out, name), "w") as f:
        json.dump(data, f)
"""


def records_of(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def wait_for(condition, seconds, what):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.05)


def trainings(run_dir):
    """The live training processes (of any experiment script) that write into run_dir."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if (any(script in cmdline for script in ff_runs.SCRIPTS) and str(run_dir) in cmdline
                and p.info["status"] != psutil.STATUS_ZOMBIE):
            found.append(p)
    return found


@pytest.fixture
def spawn():
    """spawn(cmd, **popen) starts a process; each one, and all it started, dies at the end."""
    started = []

    def start(cmd, **popen):
        proc = subprocess.Popen(cmd, **popen)
        started.append(psutil.Process(proc.pid))
        return proc
    yield start
    for proc in started:
        try:
            family = [proc] + proc.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=5)


@contextlib.contextmanager
def dask_processes(tmp, n_workers):
    """A `dask scheduler` and n_workers `dask worker` processes of one thread each on
    127.0.0.1, started as docs/sweeps.md says: {"address", "scheduler", "workers"}. Workers
    have no nanny, so a killed worker stays dead; each is killed at the end, with what it
    started."""
    loopback = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
    procs = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dask", "scheduler", "--port", "0", *loopback,
             "--scheduler-file", str(tmp / "scheduler.json")], stderr=subprocess.DEVNULL))
        wait_for(lambda: os.path.exists(tmp / "scheduler.json"), 20, "scheduler")
        wait_for(lambda: "address" in json.loads(open(tmp / "scheduler.json").read() or "{}"),
                 5, "scheduler address")
        address = json.load(open(tmp / "scheduler.json"))["address"]
        workers = [subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", address, "--nthreads", "1", "--no-nanny",
             *loopback, "--local-directory", str(tmp)], stderr=subprocess.DEVNULL)
            for _ in range(n_workers)]
        procs += workers
        from distributed import Client
        with Client(address, timeout=10) as client:
            client.wait_for_workers(n_workers, timeout=20)
        yield {"address": address, "scheduler": procs[0], "workers": workers}
    finally:
        for p in procs:
            try:
                family = [p] + psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                family = [p]
            for q in family:
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    q.kill()
            p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two single-threaded workers (see dask_processes), for the module."""
    with dask_processes(tmp_path_factory.mktemp("cluster"), 2) as started:
        yield started


def sweep_ns(tmp_path, **given):
    """The sweep's settings, as build_parser gives them, for a test that calls its parts."""
    argv = [str(tmp_path / "cfg.txt"), "--out-dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "r.jsonl")]
    return argparse.Namespace(**{**vars(sweep.build_parser().parse_args(argv)), **given})


def sleeper_runs(tmp_path, ns, seconds):
    """(job, todo) of runs of the sleeping stand-in: {label: seconds} in list order."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    job = sweep.make_job(ns)
    job.train_scripts = dict.fromkeys(job.train_scripts, str(tmp_path / "sleeper.py"))
    return job, [(sweep.Run(label, ["--sleep", str(s)], n), None)
                 for n, (label, s) in enumerate(seconds.items(), 1)]


@pytest.mark.cluster
def test_sweep_records_each_run_and_its_refit(tmp_path):
    """The default: a LocalCluster of --jobs workers, nothing started by hand."""
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"# two tiny runs\n\na {TINY_LINE}\nb {TINY_LINE} --threshold 8\n")
    results = tmp_path / "r.jsonl"
    assert sweep.main([str(cfg), "--jobs", "2", "--threads", "1", "--refit-top-k", "2",
                       "--out-dir", str(tmp_path / "runs"), "--results", str(results)]) == 0
    records = {r["label"]: r for r in records_of(results)}
    assert set(records) == {"a", "b"}
    for label, r in records.items():
        assert r["rc"] == 0 and r["refit_rc"] == 0 and r["refit_top_k"] == 2
        assert r["status"] == "finished" and r["attempts"] == 1 and r["threads"] == 1
        assert r["script"] == r["config"]["script"] == "ff_hybrid_mnist.py"
        saved = json.load(open(tmp_path / "runs" / label / "metrics.json"))
        assert r["metrics"]["test_error"] == saved["test_error"]
        assert r["config"] == json.load(open(tmp_path / "runs" / label / "args.json"))
        assert 0 <= r["refit_test_error"] <= 1
    assert json.load(open(tmp_path / "runs" / "b" / "args.json"))["threshold"] == 8
    table = plot_threshold_sweep.markdown_table(list(records.values()))
    assert "`--layer-sizes 784,30,20" in table and "--threshold 8" in table


@pytest.mark.cluster
def test_sweep_on_a_cluster_given_by_address_records_every_run(cluster, tmp_path):
    """Three runs through --scheduler: two finish, one fails by itself (exit 1: its
    --data-dir holds no MNIST) and is recorded once, not tried again."""
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"base {TINY_LINE}\na\nb --seed 1\nbad --data-dir {tmp_path}\n")
    results, out = tmp_path / "r.jsonl", tmp_path / "runs"
    done = subprocess.run(SWEEP + [str(cfg), "--scheduler", cluster["address"], "--threads", "1",
                                   "--out-dir", str(out), "--results", str(results)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    records = {r["label"]: r for r in records_of(results)}
    assert len(records_of(results)) == 3
    for label in "ab":
        r = records[label]
        assert r["status"] == "finished" and r["rc"] == 0 and r["attempts"] == 1
        assert r["metrics"] == json.load(open(out / label / "metrics.json"))
        assert r["environment"]["numpy"] and r["worker"].startswith("tcp://127.0.0.1:")
    assert records["a"]["metrics"]["test_error"] != records["b"]["metrics"]["test_error"]
    bad = records["bad"]
    assert bad["status"] == "failed" and bad["rc"] == 1 and bad["attempts"] == 1
    assert "lacks train-images-idx3-ubyte" in open(out / "bad.log").read()
    printed = done.stdout
    assert f"3 runs on the cluster at {cluster['address']}" in printed
    assert "[00:00:" in printed and "3 ended, 0 running, 0 queued" in printed


@pytest.mark.cluster
def test_a_run_whose_worker_is_killed_goes_on_from_its_checkpoint(cluster, tmp_path, spawn):
    """SIGKILL to the worker running a configuration, after its first checkpoint: its
    training dies with it, another worker continues the run (the folder is shared), and the
    run is recorded once, finished."""
    cfg, results, out = tmp_path / "cfg.txt", tmp_path / "r.jsonl", tmp_path / "runs"
    cfg.write_text(f"slow {SLOW}\n")
    client = spawn(SWEEP + [str(cfg), "--scheduler", cluster["address"], "--threads", "1",
                            "--out-dir", str(out), "--results", str(results)],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for(lambda: os.path.exists(out / "slow" / "checkpoint.npz") and trainings(out / "slow"),
             30, "first checkpoint")
    [training] = trainings(out / "slow")
    killed = psutil.Process(training.ppid())
    assert killed.pid in [w.pid for w in cluster["workers"]]
    killed.kill()
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 0, stderr
    assert not training.is_running() or training.status() == psutil.STATUS_ZOMBIE
    [record] = records_of(results)
    assert record["status"] == "finished" and record["rc"] == 0
    assert record["attempts"] == 2 and record["resumed"]
    assert record["metrics"]["ff_epochs"] == 12
    log = open(out / "slow.log").read()
    assert "attempt 1 on" in log and "attempt 2 on" in log and "resuming" in log
    assert f"attempt 2 on {record['worker']}, commit" in log


@pytest.mark.cluster
def test_a_run_whose_workers_keep_dying_is_recorded_as_failed(tmp_path, spawn):
    """With distributed.scheduler.allowed-failures 0, one worker death is one too many: the
    run is recorded as failed with the reason, and the sweep goes on."""
    cfg, results, out = tmp_path / "cfg.txt", tmp_path / "r.jsonl", tmp_path / "runs"
    cfg.write_text(f"slow {SLOW}\n")
    env = dict(os.environ, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    client = spawn(SWEEP + [str(cfg), "--jobs", "1", "--threads", "1", "--out-dir", str(out),
                            "--results", str(results)], env=env,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for(lambda: trainings(out / "slow"), 30, "training")
    [training] = trainings(out / "slow")
    psutil.Process(training.ppid()).kill()
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 0, stderr
    [record] = records_of(results)
    assert record["status"] == "failed" and record["rc"] is None
    assert record["reason"].startswith("KilledWorker: ")
    assert "slow" in stdout and "failed: KilledWorker" in stdout
    assert not trainings(out / "slow")


@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c to the process group", "sigterm to the client"])
@pytest.mark.cluster
def test_a_stopped_sweep_stops_its_trainings_and_records_them(tmp_path, spawn, signum, to_group):
    """Ctrl-C at a terminal (SIGINT to the client, its local workers and all) or SIGTERM to
    the client, while one run trains and one waits: the training stops (no process of the
    sweep remains), both runs are recorded as interrupted, the exit status is 130 with one
    line."""
    cfg, results, out = tmp_path / "cfg.txt", tmp_path / "r.jsonl", tmp_path / "runs"
    cfg.write_text(f"base {SLOW}\nfirst\nsecond\n")
    argv = [str(cfg), "--jobs", "1", "--threads", "1", "--out-dir", str(out),
            "--results", str(results)]
    client = spawn(SWEEP + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                   start_new_session=True, cwd=ROOT)
    running = lambda: [p for label in ("first", "second") for p in trainings(out / label)]  # noqa: E731
    wait_for(lambda: running() and any(os.path.exists(out / label / "checkpoint.npz")
                                       for label in ("first", "second")), 30, "first checkpoint")
    family = psutil.Process(client.pid).children(recursive=True)
    if to_group:
        os.killpg(client.pid, signum)
    else:
        client.send_signal(signum)
    stdout, stderr = client.communicate(timeout=30)
    assert client.returncode == 130
    assert stderr.startswith(f"error: interrupted by {signum.name}; 2 runs recorded as interrupted")
    assert stderr.count("\n") == 1, stderr
    gone, alive = psutil.wait_procs(family, timeout=5)
    assert not alive and not running()
    records = {r["label"]: r for r in records_of(results)}
    assert len(records_of(results)) == 2
    assert {r["status"] for r in records.values()} == {"interrupted"}
    stopped = [label for label, r in records.items() if r["rc"] is not None]
    assert len(stopped) == 1 and records[stopped[0]]["rc"] == 130
    assert "error: interrupted; the checkpoint after epoch" in open(out / f"{stopped[0]}.log").read()


@pytest.mark.cluster
def test_an_unreachable_scheduler_is_one_line_and_exit_2(tmp_path, capsys):
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"a {TINY_LINE}\n")
    t0 = time.time()
    status = sweep.main([str(cfg), "--scheduler", "tcp://127.0.0.1:9", "--out-dir",
                         str(tmp_path / "runs"), "--results", str(tmp_path / "r.jsonl")])
    assert status == 2 and time.time() - t0 < 10
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the scheduler at tcp://127.0.0.1:9") and err.count("\n") == 1
    assert os.listdir(tmp_path) == ["cfg.txt"]  # no run folder, results or lock left


@pytest.mark.parametrize("text, says", [
    ("a --out x\n", "cfg.txt:1: the sweep sets --out and --resume itself"),
    ("a --resume x\n", "cfg.txt:1: the sweep sets --out and --resume itself"),
    ("a --lr 0.1\n\na --lr 0.2\n", "cfg.txt:3: label a repeats line 1"),
    ("a --lr 0.1\nb --note 'unbalanced\n", "cfg.txt:2: No closing quotation"),
    (None, "cannot read the sweep list"),
    # a line's flags, as the training CLI reads them: the line and label, not its usage
    ("a --lr 0.1\nb --lr\n", "cfg.txt:2 (b): argument --lr: expected one argument"),
    ("a --nope 3\n", "cfg.txt:1 (a): unrecognized arguments: --nope 3"),
    ("a --lr x\n", "cfg.txt:1 (a): argument --lr: 'x' is not a number"),
    ("a --top-k 9\n", "cfg.txt:1 (a): --top-k 9 exceeds the 4 layers of --layer-sizes"),
    ("", "no runs in "),
    ("# only\n\n# comments\n", "no runs in "),
    (f"base {TINY_LINE}\n", "no runs in "),
    (b"a --lr 0.1\nb --note caf\xe9\n", "cfg.txt:2: not UTF-8 text (byte 0xe9)"),
    # a label names a folder in --out-dir: nothing outside it
    ("../up --lr 0.1\n", "cfg.txt:1 (../up): a label names its run folder in --out-dir"),
    ("a/b --lr 0.1\n", "cfg.txt:1 (a/b): a label names"),
    ("/tmp/x --lr 0.1\n", "cfg.txt:1 (/tmp/x): a label names"),
    (".hidden --lr 0.1\n", "cfg.txt:1 (.hidden): a label names"),
    ("a..b --lr 0.1\n", "cfg.txt:1 (a..b): a label names"),
    ("--lr 0.1\n", "cfg.txt:1 (--lr): a label names"),
])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_sweep_refuses_lists_it_would_misread(tmp_path, capsys, text, says, dry_run):
    cfg = tmp_path / "cfg.txt"
    if isinstance(text, str):
        cfg.write_text(text)
    elif text is not None:
        cfg.write_bytes(text)
    assert sweep.main([str(cfg), "--out-dir", str(tmp_path / "runs"),
                       "--results", str(tmp_path / "r.jsonl")] + ["--dry-run"] * dry_run) == 2
    err = one_line(capsys.readouterr().err)
    assert says in err, err
    assert sorted(os.listdir(tmp_path)) == ["cfg.txt"] * (text is not None)


def test_a_backprop_list_is_refused_with_how_to_run_it(capsys, tmp_path):
    """experiments/baselines/sweep_backprop.txt holds the backprop baseline's flags, which the
    training CLI would read too (--lr, --n-epochs, ...): read as FF runs, it would train
    something else than it says."""
    backprop = os.path.join(ROOT, "experiments", "baselines", "sweep_backprop.txt")
    assert sweep.main([backprop, "--out-dir", str(tmp_path / "runs"),
                       "--results", str(tmp_path / "r.jsonl")]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{backprop} is a backprop list" in err
    assert f"experiments/baselines/run_backprop_list.sh {backprop} RESULTS" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, says", [
    (["--jobs", "0"], "--jobs 0 must be at least 1"),
    (["--jobs", "-2"], "--jobs -2 must be at least 1"),
    (["--threads", "0"], "--threads 0 must be at least 1"),
    (["--start-within", "-1"], "--start-within -1 must be a number of seconds, 0 or more"),
    (["--start-within", "nan"], "--start-within nan must be a number of seconds"),
    (["--refit-top-k", "-1"], "--refit-top-k -1 must be 0 (no refit) or more"),
    (["--refit-top-k", "3"], "cfg.txt:2 (b): --refit-top-k 3 exceeds the run's 2 layers"),
    (["--out-dir", "{tmp}/afile"], "--out-dir {tmp}/afile is a file, not a folder"),
    (["--results", "{tmp}/nofolder/r.jsonl"],
     "--results {tmp}/nofolder/r.jsonl: its folder {tmp}/nofolder does not exist"),
    (["--results", "{tmp}"], "--results {tmp} is a folder; give the path of a file"),
])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_sweep_refuses_settings_before_anything_starts(tmp_path, capsys, flags, says, dry_run):
    """Each in one line, exit status 2, before a cluster starts or anything is written."""
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"a --layer-sizes 784,20,20,20\nb {TINY_LINE}\n")
    (tmp_path / "afile").write_text("")
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert sweep.main([str(cfg), "--out-dir", str(tmp_path / "runs"), "--results",
                       str(tmp_path / "r.jsonl"), *flags] + ["--dry-run"] * dry_run) == 2
    assert says.format(tmp=tmp_path) in one_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["afile", "cfg.txt"]


def test_the_results_folder_may_be_the_one_the_sweep_makes_for_out_dir(tmp_path, capsys):
    """--out-dir runs/x --results runs/x.jsonl in a checkout without runs/ yet (as the docs
    show it): the sweep makes runs/ for the run folders, so the results' folder is there."""
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"a {TINY_LINE}\n")
    assert sweep.main([str(cfg), "--out-dir", str(tmp_path / "runs" / "x"),
                       "--results", str(tmp_path / "runs" / "x.jsonl"), "--dry-run"]) == 0
    assert "a                        ok: " in capsys.readouterr().out


def test_sweep_refuses_a_results_folder_before_training(tmp_path, capsys):
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"a {TINY_LINE}\n")
    (tmp_path / "results").mkdir()
    for extra in ([], ["--dry-run"]):
        assert sweep.main([str(cfg), "--out-dir", str(tmp_path / "runs"),
                           "--results", str(tmp_path / "results"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --results") and "is a folder" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "runs")


def test_resume_skips_a_cut_short_last_line_with_a_warning(tmp_path, capsys):
    """A sweep killed while writing a record leaves half a line: --resume warns and skips
    it, and the next record starts a line of its own."""
    cfg, results = tmp_path / "cfg.txt", tmp_path / "r.jsonl"
    cfg.write_text(f"a {TINY_LINE}\n")
    whole = json.dumps({"label": "a", "args": TINY_LINE.split(), "rc": 0, "status": "finished"})
    results.write_text(whole + "\n" + whole[:20])
    assert sweep.main([str(cfg), "--resume", "--out-dir", str(tmp_path / "runs"),
                       "--results", str(results)]) == 0
    captured = capsys.readouterr()
    assert "warning: " + str(results) + ":2 is not a whole record" in captured.err
    assert "a                        finished earlier" in captured.out
    with sweep.open_results(str(results)) as f:
        sweep.write_record(f, {"label": "b"})
    assert results.read_text() == whole + "\n" + whole[:20] + "\n" + '{"label": "b"}\n'


@pytest.mark.cluster
def test_sweep_resume_goes_on_from_the_checkpoint_and_skips_recorded_runs(tmp_path, capsys):
    """A run cut after its first epoch, continued by `sweep --resume`, ends with the numbers
    of an uninterrupted run; so does a run recorded as finished after one epoch when the list
    now says two (its record no longer counts, it goes on from its checkpoint); running the
    sweep again leaves the recorded runs alone."""
    out, results = tmp_path / "runs", tmp_path / "r.jsonl"
    flags = TINY_LINE.split() + ["--n-epochs", "2"]
    first = tmp_path / "first.txt"
    first.write_text(f"base {TINY_LINE}\ncut\ndone\n")  # 1 epoch, checkpointed, 1 BLAS thread
    sweep.main([str(first), "--threads", "1", "--jobs", "2", "--out-dir", str(out),
                "--results", str(results)])
    for name in ("metrics.json", "model.npz"):  # as if killed before the end
        os.remove(out / "cut" / name)
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"base {' '.join(flags)}\ncut\ndone\nfull\n")
    argv = [str(cfg), "--threads", "1", "--jobs", "2", "--resume", "--out-dir", str(out),
            "--results", str(results)]
    assert sweep.main(argv[:1] + ["--dry-run"] + argv[1:]) == 0
    assert (f"done                     ok: ff_hybrid_mnist.py {' '.join(flags)}  (goes on from "
            "its checkpoint to --n-epochs 2)") in capsys.readouterr().out
    sweep.main(argv)
    records = {r["label"]: r for r in records_of(results)[2:]}
    assert records["cut"]["resumed"] and records["done"]["resumed"]
    assert not records["full"]["resumed"]
    for label in ("cut", "done"):
        assert records[label]["metrics"]["ff_epochs"] == 2
        assert records[label]["metrics"]["ff_loss"] == records["full"]["metrics"]["ff_loss"]
        assert records[label]["metrics"]["test_error"] == records["full"]["metrics"]["test_error"]
        assert records[label]["args"] == flags
    log = (out / "cut.log").read_text()  # the first sitting's lines are kept
    assert "epoch   1/1" in log and "resuming" in log
    capsys.readouterr()
    sweep.main(argv)
    assert len(results.read_text().splitlines()) == 5
    assert capsys.readouterr().out.count("finished earlier") == 3


def line_config(flags, folder):
    """The configuration of a sweep line's flags (the one trainer's), as its script makes it."""
    script, flags = ff_runs.script_for(flags)
    parser = ff_runs.build_parser(ff_runs.config_class(script))
    return ff_runs.parse_args(flags + ["--out", str(folder)], parser=parser).config


def before_the_split(cfg):
    """cfg as a run saved before the scripts were split stored it: no script, and every
    field of every experiment (the others' at the old trainer's defaults)."""
    label_fields = ff_runs.config_class("ff_label_mnist.py").__dataclass_fields__
    old = {name: f.default for name, f in label_fields.items()}
    old.update(negatives=cfg.negatives, local="")
    old.update(dataclasses.asdict(cfg))
    return old


def finished_run(folder, flags, saved=ff_runs.config_record):
    """A run folder as a finished run leaves it (without a checkpoint: --n-epochs 0), and its
    record: what --resume compares with the list. saved: what its args.json holds of the
    configuration (before_the_split: as a run of the one trainer left it)."""
    folder.mkdir(parents=True)
    cfg = line_config(flags, folder)
    (folder / "args.json").write_text(json.dumps(saved(cfg)))
    (folder / "metrics.json").write_text("{}")
    return {"label": folder.name, "args": flags, "rc": 0, "status": "finished"}


@pytest.mark.parametrize("kept, listed, says", [
    ("--threshold 2", "--threshold 8", "run folder holds --threshold 2.0, the list says 8.0"),
    ("--n-epochs 2", "--n-epochs 1", "run folder holds --n-epochs 2, the list says 1"),
    ("--n-epochs 0", "--n-epochs 1",
     "run folder holds --n-epochs 0, the list says 1 (and no checkpoint to go on from)"),
    ("--head lbfgs", "", "run folder holds --head lbfgs, the list says sgd"),
    # another script's run: the line's flags select the script (--negatives label)
    ("", "--negatives label",
     "run folder holds a run of ff_hybrid_mnist.py, the list's line runs ff_label_mnist.py"),
    ("--negatives label --hard-negatives", "--negatives label",
     "run folder holds --hard-negatives True, the list says False"),
])
def test_resume_refuses_a_run_folder_of_another_configuration(tmp_path, capsys, kept, listed, says):
    """A list changed since the run folder was written: --resume would mix the two, so the
    sweep refuses in one line naming the line, before anything starts."""
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"ok {TINY_LINE}\nchanged {TINY_LINE} {listed}\n")
    finished_run(tmp_path / "runs" / "changed", TINY_LINE.split() + kept.split())
    for extra in ([], ["--dry-run"]):
        assert sweep.main([str(cfg), "--resume", "--out-dir", str(tmp_path / "runs"),
                           "--results", str(tmp_path / "r.jsonl"), *extra]) == 2
        assert f"cfg.txt:2 (changed): {says}" in one_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["cfg.txt", "runs"]
    assert os.listdir(tmp_path / "runs") == ["changed"]


def test_resume_refuses_a_finished_record_of_another_configuration(tmp_path, capsys):
    """A finished record counts only with the list line's configuration (written the same
    way or not: `base` and the order of the flags do not matter). A record written before
    the converged head, whose args name no head, ran the SGD head: a line that says
    --head sgd is the same run."""
    cfg, results = tmp_path / "cfg.txt", tmp_path / "r.jsonl"
    cfg.write_text(f"base {TINY_LINE}\nsame --seed 1\nold --seed 2\nchanged --lr 0.01\n")
    no_head = TINY_LINE.replace("--head sgd ", "").split()
    records = [{"label": "same", "args": ["--seed", "1"] + TINY_LINE.split()},
               {"label": "old", "args": no_head + ["--seed", "2"]},
               {"label": "changed", "args": TINY_LINE.split() + ["--lr", "0.02"]}]
    results.write_text("".join(json.dumps({**r, "rc": 0, "status": "finished"}) + "\n"
                               for r in records))
    assert sweep.main([str(cfg), "--resume", "--out-dir", str(tmp_path / "runs"),
                       "--results", str(results)]) == 2
    captured = capsys.readouterr()
    assert "same                     finished earlier" in captured.out
    assert "old                      finished earlier" in captured.out
    assert (f"cfg.txt:4 (changed): {results}:3 holds --lr 0.02, the list says 0.01"
            in one_line(captured.err))
    assert sorted(os.listdir(tmp_path)) == ["cfg.txt", "r.jsonl"]


@pytest.mark.parametrize("line, script, flags", [
    ("--negatives label --hard-negatives", "ff_label_mnist.py", "--hard-negatives"),
    ("--hard-negatives --negatives=label", "ff_label_mnist.py", "--hard-negatives"),
    ("--local 10:6:4,2:1:5 --peer-norm 0.03", "ff_local_mnist.py",
     "--local 10:6:4,2:1:5 --peer-norm 0.03"),
    ("--negatives hybrid --threshold 8", "ff_hybrid_mnist.py", "--threshold 8"),
])
def test_each_line_is_checked_and_run_by_the_script_of_its_experiment(tmp_path, capsys, line,
                                                                      script, flags):
    """The lists are written for the one trainer the scripts were split from: --negatives
    label is ff_label_mnist.py's run (without that flag, which no script has), --local
    ff_local_mnist.py's; --dry-run checks each line with its script's flags and names it."""
    cfg = tmp_path / "cfg.txt"
    base = TINY_LINE.replace("--layer-sizes 784,30,20 ", "") if "--local" in line else TINY_LINE
    cfg.write_text(f"base {base}\na {line}\n")
    assert sweep.main([str(cfg), "--out-dir", str(tmp_path / "runs"),
                       "--results", str(tmp_path / "r.jsonl"), "--dry-run"]) == 0
    assert f"a                        ok: {script} {base} {flags}\n" in capsys.readouterr().out
    [run] = sweep.read_configs(str(cfg))
    assert type(sweep.check_sweep(sweep_ns(tmp_path), [run])["a"]).SCRIPT == script
    assert os.listdir(tmp_path) == ["cfg.txt"]


@pytest.mark.parametrize("line, says", [
    ("--hard-negatives", "cfg.txt:1 (a): --hard-negatives is not a flag of ff_hybrid_mnist.py: "
                         "it belongs to ff_label_mnist.py and ff_recurrent_mnist.py (a list "
                         "line runs it with --negatives label)"),
    ("--negatives label --local 10:6:4", "cfg.txt:1 (a): --negatives label with --local: "
                                         "no script runs both"),
    ("--negatives label --n-blur 2", "cfg.txt:1 (a): --n-blur 2 is unused: label negatives "
                                     "have no mask"),
    ("--local 10:6:4 --layer-sizes 784,30", "cfg.txt:1 (a): --layer-sizes 784,30 disagrees "
                                            "with --local 10:6:4"),
])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_line_its_script_refuses_is_one_line(tmp_path, capsys, line, says, dry_run):
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"a {line}\n")
    assert sweep.main([str(cfg), "--out-dir", str(tmp_path / "runs"),
                       "--results", str(tmp_path / "r.jsonl")] + ["--dry-run"] * dry_run) == 2
    assert says in one_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == ["cfg.txt"]


def test_resume_reads_runs_and_records_saved_before_the_split(tmp_path, capsys):
    """Run folders and records of the one trainer hold every experiment's fields and no
    script: --resume reads them as the configuration of the script their fields name
    (ff_runs.run_config), so a label or local run counts for its line, and one of another
    experiment than its line is refused, naming both scripts."""
    cfg, results, runs = tmp_path / "cfg.txt", tmp_path / "r.jsonl", tmp_path / "runs"
    label = f"{TINY_LINE} --negatives label --hard-negatives"
    local = TINY_LINE.replace("--layer-sizes 784,30,20", "--local 10:6:4,2:1:5")
    cfg.write_text(f"lab {label}\nloc {local}\nrec {label} --seed 3\nhyb {TINY_LINE}\n")
    finished_run(runs / "lab", label.split(), saved=before_the_split)
    finished_run(runs / "loc", local.split(), saved=before_the_split)
    old = {"label": "rec", "args": ["--seed", "3"] + label.split(), "rc": 0,
           "status": "finished",
           "config": before_the_split(line_config(label.split() + ["--seed", "3"],
                                                  tmp_path / "elsewhere"))}
    results.write_text(json.dumps(old) + "\n")
    argv = [str(cfg), "--resume", "--out-dir", str(runs), "--results", str(results),
            "--dry-run"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    for name in ("lab", "loc"):
        assert f"{name:24s} ok: finished in its folder, recorded without training" in out
    assert "rec                      finished earlier" in out
    assert f"hyb                      ok: ff_hybrid_mnist.py {TINY_LINE}\n" in out
    cfg.write_text(f"rec {TINY_LINE} --seed 3\n")  # the record's run was a label run
    assert sweep.main(argv) == 2
    assert (f"cfg.txt:1 (rec): {results}:1 holds a run of ff_label_mnist.py, the list's line "
            "runs ff_hybrid_mnist.py") in one_line(capsys.readouterr().err)
    cfg.write_text(f"loc {local} --threshold 8\n")
    assert sweep.main(argv) == 2
    assert ("cfg.txt:1 (loc): run folder holds --threshold 2.0, the list says 8.0"
            in one_line(capsys.readouterr().err))


COMMITTED = [("sweep_val_label.txt", "sweep-val-label.jsonl"),
             ("sweep_label_hard_paper.txt", "label-hard-paper.jsonl"),
             ("sweep_val_local.txt", "sweep-val-local.jsonl"),
             ("sweep_local_paper_net_seeds.txt", "local-paper-net.jsonl")]


@pytest.mark.parametrize("name, results", COMMITTED)
def test_committed_label_and_local_records_count_for_their_lists(name, results, tmp_path,
                                                                 capsys):
    """The committed records of label and local runs, written by the one trainer, are still
    the finished runs of their lists' lines: --resume would train none of them again."""
    path = os.path.join(LISTS_DIR, name)
    n_runs = len(sweep.read_configs(path))
    assert sweep.main([path, "--resume", "--out-dir", str(tmp_path / "o"), "--dry-run",
                       "--results", os.path.join(ROOT, "experiments", "results", results)]) == 0
    out = capsys.readouterr().out
    assert out.count(" finished earlier: recorded in ") == n_runs > 0 and " ok: " not in out


@pytest.mark.cluster
def test_label_and_local_lines_run_their_scripts_and_their_records_name_them(tmp_path):
    """A --negatives label line trains with ff_label_mnist.py, a --local line with
    ff_local_mnist.py (their run folders say so, and so do their metrics); each record names
    its script beside the line's own args."""
    cfg, results, out = tmp_path / "cfg.txt", tmp_path / "r.jsonl", tmp_path / "runs"
    local = TINY_LINE.replace("--layer-sizes 784,30,20", "--local 10:6:4,2:1:5")
    cfg.write_text(f"lab {TINY_LINE} --negatives label\nloc {local}\n")
    assert sweep.main([str(cfg), "--jobs", "2", "--threads", "1", "--out-dir", str(out),
                       "--results", str(results)]) == 0
    records = {r["label"]: r for r in records_of(results)}
    for label, script, args in (("lab", "ff_label_mnist.py", f"{TINY_LINE} --negatives label"),
                                ("loc", "ff_local_mnist.py", local)):
        r = records[label]
        assert r["status"] == "finished" and r["rc"] == 0
        assert r["script"] == script and r["args"] == args.split()
        assert r["config"] == json.load(open(out / label / "args.json"))
        assert r["config"]["script"] == script
    assert "goodness_test_error" in records["lab"]["metrics"]
    assert "goodness_test_error" not in records["loc"]["metrics"]
    assert records["loc"]["config"]["local"] == "10:6:4,2:1:5"


@pytest.mark.parametrize("content, says", [
    (b'{"label": "a", "args": [], "status": "finished"}\n42\n', "r.jsonl:2: not a sweep record"),
    (b'{"status": "finished"}\n', "r.jsonl:1: not a sweep record"),
    (b'{"label": "a", "status": "finished", "args": "--lr 1"}\n', "r.jsonl:1: not a sweep record"),
    (b'{"label": "a\xff"}\n', "r.jsonl:1: not UTF-8 text (byte 0xff); is it a results file?"),
])
def test_resume_refuses_a_results_file_it_cannot_read(tmp_path, capsys, content, says):
    cfg, results = tmp_path / "cfg.txt", tmp_path / "r.jsonl"
    cfg.write_text(f"a {TINY_LINE}\n")
    results.write_bytes(content)
    assert sweep.main([str(cfg), "--resume", "--out-dir", str(tmp_path / "runs"),
                       "--results", str(results)]) == 2
    assert says in one_line(capsys.readouterr().err)
    assert results.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ["cfg.txt", "r.jsonl"]


@pytest.mark.parametrize("held", ["--out-dir", "--results"])
def test_a_second_sweep_on_the_same_out_dir_or_results_is_refused_at_once(tmp_path, capsys, held):
    """Another sweep holds the folder or the results file (here this process, through the
    sweep's own locks: flock is per open file, so a second open is a second holder): this one
    is refused in one line naming that sweep, before a cluster starts; once it ends, the
    locks are gone with their files."""
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"a {TINY_LINE}\n")
    other = {"--out-dir": (tmp_path / "runs", tmp_path / "other.jsonl"),
             "--results": (tmp_path / "other-runs", tmp_path / "r.jsonl")}[held]
    first = sweep_ns(tmp_path, configs="first.txt", out_dir=str(other[0]), results=str(other[1]))
    with sweep.sweep_locks(first):
        t0 = time.time()
        assert sweep.main([str(cfg), "--out-dir", str(tmp_path / "runs"),
                           "--results", str(tmp_path / "r.jsonl")]) == 2
        assert time.time() - t0 < 5
        err = one_line(capsys.readouterr().err)
        path = tmp_path / ("runs" if held == "--out-dir" else "r.jsonl")
        assert err.startswith(f"error: {held} {path} is in use by another sweep (process "
                              f"{os.getpid()}, the sweep of first.txt, since ")
        assert f"wait for it to end or give another {held}" in err
        assert not os.path.exists(tmp_path / "r.jsonl")
    assert not os.path.exists(other[0]) and not os.path.exists(str(other[1]) + ".lock")
    with sweep.sweep_locks(sweep_ns(tmp_path)):  # free again
        pass


@pytest.mark.cluster
def test_every_worker_is_busy_while_runs_wait(tmp_path):
    """Two quick runs, a long one, three short ones, on two single-threaded workers: a run
    goes to a worker only when its thread is free, in list order, so the long one starts as
    soon as a quick one ends and the other worker takes the short ones meanwhile. (Handed to
    the scheduler all at once, each run was placed on a worker at submission, and there the
    long one waited behind short ones.)"""
    ns = sweep_ns(tmp_path, jobs=2, threads=1)
    seconds = {"q-1": 0.2, "q-2": 0.2, "a-1": 3, "b-1": 1, "b-2": 1, "b-3": 1}
    job, todo = sleeper_runs(tmp_path, ns, seconds)
    client, cluster = sweep.connect(ns)
    try:
        with open(tmp_path / "r.jsonl", "a") as results:
            assert sweep.collect(client, todo, job, results) == 0
    finally:
        client.close()
        cluster.close()
    runs = {r["label"]: r for r in records_of(tmp_path / "r.jsonl")}
    start = {label: r["metrics"]["start"] for label, r in runs.items()}
    end = {label: r["metrics"]["end"] for label, r in runs.items()}
    assert len({r["worker"] for r in runs.values()}) == 2
    assert start["a-1"] < start["b-2"]  # in list order: b-2 waits for b-1, on the other worker
    # the long run starts as a quick one frees a thread (0.3 s here; handed out at once, it
    # waited behind a short run on its worker: 1.6-1.9 s)
    assert start["a-1"] - min(end["q-1"], end["q-2"]) < 0.8
    assert all(start[b] < end["a-1"] for b in ("b-1", "b-2", "b-3"))  # both workers busy
    ideal = seconds["q-1"] + seconds["a-1"]  # the long run right after a quick one
    span = max(end.values()) - min(start.values())
    assert span < ideal + 2, span  # process starts and polling: about 4.3 s here


@pytest.mark.cluster
def test_a_scheduler_that_goes_away_ends_the_sweep_in_one_line(tmp_path, spawn):
    """The scheduler killed while a run trains: the client's tasks are cancelled
    (FuturesCancelledError); the sweep records the running and the queued run as
    interrupted and exits 1 with one line, at once."""
    cfg, results, out = tmp_path / "cfg.txt", tmp_path / "r.jsonl", tmp_path / "runs"
    cfg.write_text(f"base {SLOW}\nfirst\nsecond\n")
    with dask_processes(tmp_path, 1) as started:
        client = spawn(SWEEP + [str(cfg), "--scheduler", started["address"], "--threads", "1",
                                "--out-dir", str(out), "--results", str(results)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        wait_for(lambda: trainings(out / "first"), 30, "training")
        started["scheduler"].kill()
        t0 = time.time()
        stdout, stderr = client.communicate(timeout=30)
        assert time.time() - t0 < 10
    assert client.returncode == 1
    err = one_line(stderr)  # the cancelled tasks, or the scheduler's silence: either may come first
    assert err.startswith("error: the scheduler or the cluster went away (")
    assert "); 2 runs recorded as interrupted, with their checkpoints kept" in err
    assert [(r["label"], r["status"]) for r in records_of(results)] == [
        ("first", "interrupted"), ("second", "interrupted")]


LISTS = sorted(name for name in os.listdir(LISTS_DIR)
               if name.startswith("sweep_") and name.endswith(".txt") and "backprop" not in name)


@pytest.mark.parametrize("name", LISTS)
def test_every_committed_list_is_accepted_as_it_stands(name, tmp_path, capsys):
    # the lists reproduce the committed records: each line must still pass the trainer's
    # checks (a rule added later, such as refusing an ignored flag, must not break one)
    path = os.path.join(LISTS_DIR, name)
    status = sweep.main([path, "--out-dir", str(tmp_path / "o"),
                         "--results", str(tmp_path / "r.jsonl"), "--dry-run"])
    assert status in (0, None), capsys.readouterr().err


def test_a_line_may_name_its_script(tmp_path, capsys):
    """`--script ff_recurrent_mnist.py` runs that script with the line's other flags (its own
    flags, checked by its parser); a script that does not exist is refused in one line."""
    cfg = tmp_path / "cfg.txt"
    flags = "--layer-sizes 784,30,20 --n-epochs 1 --n-train 300 --batch-size 50 --damping 0.5"
    cfg.write_text(f"r --script ff_recurrent_mnist.py {flags}\n")
    argv = [str(cfg), "--out-dir", str(tmp_path / "runs"), "--results",
            str(tmp_path / "r.jsonl"), "--dry-run"]
    assert sweep.main(argv) == 0
    assert f"ok: ff_recurrent_mnist.py {flags}\n" in capsys.readouterr().out
    [run] = sweep.read_configs(str(cfg))
    assert type(sweep.check_sweep(sweep_ns(tmp_path), [run])["r"]).SCRIPT == "ff_recurrent_mnist.py"
    cfg.write_text(f"r --script ff_nothing.py {flags}\n")
    assert sweep.main(argv) == 2
    assert "--script ff_nothing.py is not one of" in one_line(capsys.readouterr().err)
