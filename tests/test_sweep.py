"""The sweep runner: each configuration is a task of a Dask cluster (a LocalCluster by
default, or one given by --scheduler), its record lands in the results file once, a worker
killed mid-run is survived, Ctrl-C leaves no training behind, and lists or paths it would
misread are refused with one line. Real processes on 127.0.0.1 only; every process a test
starts is killed at its end, with whatever it started."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import plot_threshold_sweep  # noqa: E402
import sweep  # noqa: E402
from conftest import TINY_LINE  # noqa: E402

# about 1.2 s of training in 12 epochs of 0.1 s: time to kill what runs it
SLOW = "--layer-sizes 784,200,200 --n-epochs 12 --n-train 2000 --batch-size 50 --softmax-epochs 1 --top-k 1"
SWEEP = [sys.executable, os.path.join(ROOT, "experiments", "sweep.py")]


def records_of(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def wait_for(condition, seconds, what):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.05)


def trainings(run_dir):
    """The live training processes that write into run_dir."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if ("ff_hybrid_mnist.py" in cmdline and str(run_dir) in cmdline
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A `dask scheduler` and two `dask worker` processes of one thread each on 127.0.0.1,
    started as docs/sweeps.md says: {"address", "workers"}. Workers have no nanny, so a
    killed worker stays dead."""
    tmp = tmp_path_factory.mktemp("cluster")
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
            for _ in range(2)]
        procs += workers
        from distributed import Client
        with Client(address, timeout=10) as client:
            client.wait_for_workers(2, timeout=20)
        yield {"address": address, "workers": workers}
    finally:
        for p in procs:
            p.kill()
            p.wait()


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
        saved = json.load(open(tmp_path / "runs" / label / "metrics.json"))
        assert r["metrics"]["test_error"] == saved["test_error"]
        assert 0 <= r["refit_test_error"] <= 1
    assert json.load(open(tmp_path / "runs" / "b" / "args.json"))["threshold"] == 8
    table = plot_threshold_sweep.markdown_table(list(records.values()))
    assert "`--layer-sizes 784,30,20" in table and "--threshold 8" in table


def test_sweep_on_a_cluster_given_by_address_records_every_run(cluster, tmp_path):
    """Three runs through --scheduler: two finish, one fails by itself (exit 2: a batch
    larger than its training set) and is recorded once, not tried again."""
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"base {TINY_LINE}\na\nb --seed 1\nbad --n-train 20\n")
    results, out = tmp_path / "r.jsonl", tmp_path / "runs"
    done = subprocess.run(SWEEP + [str(cfg), "--scheduler", cluster["address"], "--threads", "1",
                                   "--out-dir", str(out), "--results", str(results)],
                          capture_output=True, text=True, timeout=60)
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
    assert bad["status"] == "failed" and bad["rc"] == 2 and bad["attempts"] == 1
    assert "--batch-size" in open(out / "bad.log").read()
    printed = done.stdout
    assert f"3 runs on the cluster at {cluster['address']}" in printed
    assert "[00:00:" in printed and "3 ended, 0 running, 0 queued" in printed


def test_a_run_whose_worker_is_killed_goes_on_from_its_checkpoint(cluster, tmp_path, spawn):
    """SIGKILL to the worker running a configuration, after its first checkpoint: its
    training dies with it, another worker continues the run (the folder is shared), and the
    run is recorded once, finished."""
    cfg, results, out = tmp_path / "cfg.txt", tmp_path / "r.jsonl", tmp_path / "runs"
    cfg.write_text(f"slow {SLOW}\n")
    client = spawn(SWEEP + [str(cfg), "--scheduler", cluster["address"], "--threads", "1",
                            "--out-dir", str(out), "--results", str(results)],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_a_run_whose_workers_keep_dying_is_recorded_as_failed(tmp_path, spawn):
    """With distributed.scheduler.allowed-failures 0, one worker death is one too many: the
    run is recorded as failed with the reason, and the sweep goes on."""
    cfg, results, out = tmp_path / "cfg.txt", tmp_path / "r.jsonl", tmp_path / "runs"
    cfg.write_text(f"slow {SLOW}\n")
    env = dict(os.environ, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    client = spawn(SWEEP + [str(cfg), "--jobs", "1", "--threads", "1", "--out-dir", str(out),
                            "--results", str(results)], env=env,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
                   start_new_session=True)
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


def test_an_unreachable_scheduler_is_one_line_and_exit_2(tmp_path, capsys):
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"a {TINY_LINE}\n")
    t0 = time.time()
    status = sweep.main([str(cfg), "--scheduler", "tcp://127.0.0.1:9", "--out-dir",
                         str(tmp_path / "runs"), "--results", str(tmp_path / "r.jsonl")])
    assert status == 2 and time.time() - t0 < 10
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the scheduler at tcp://127.0.0.1:9") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "r.jsonl")


@pytest.mark.parametrize("text, says", [
    ("a --out x\n", "cfg.txt:1: the sweep sets --out and --resume itself"),
    ("a --resume x\n", "cfg.txt:1: the sweep sets --out and --resume itself"),
    ("a --lr 0.1\n\na --lr 0.2\n", "cfg.txt:3: label a repeats line 1"),
    ("a --lr 0.1\nb --note 'unbalanced\n", "cfg.txt:2: No closing quotation"),
    (None, "cannot read the sweep list"),
])
def test_sweep_refuses_lists_it_would_misread(tmp_path, capsys, text, says):
    cfg = tmp_path / "cfg.txt"
    if text is not None:
        cfg.write_text(text)
    assert sweep.main([str(cfg), "--out-dir", str(tmp_path / "runs"),
                       "--results", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "r.jsonl")


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
    whole = json.dumps({"label": "a", "args": [], "rc": 0, "status": "finished"})
    results.write_text(whole + "\n" + whole[:20])
    assert sweep.main([str(cfg), "--resume", "--out-dir", str(tmp_path / "runs"),
                       "--results", str(results)]) == 0
    captured = capsys.readouterr()
    assert "warning: " + str(results) + ":2 is not a whole record" in captured.err
    assert "a                        finished earlier" in captured.out
    with sweep.open_results(str(results)) as f:
        sweep.write_record(f, {"label": "b"})
    assert results.read_text() == whole + "\n" + whole[:20] + "\n" + '{"label": "b"}\n'


def test_sweep_resume_goes_on_from_the_checkpoint_and_skips_recorded_runs(tmp_path, capsys):
    """A run cut after its first epoch, continued by `sweep --resume`, ends with the numbers
    of an uninterrupted run; running the sweep again leaves the recorded runs alone."""
    out, results = tmp_path / "runs", tmp_path / "r.jsonl"
    flags = TINY_LINE.split() + ["--n-epochs", "2"]
    first = tmp_path / "first.txt"
    first.write_text(f"cut {TINY_LINE}\n")  # 1 epoch, checkpointed, BLAS threads as below
    sweep.main([str(first), "--threads", "1", "--out-dir", str(out),
                "--results", str(tmp_path / "first.jsonl")])
    for name in ("metrics.json", "model.npz"):  # as if killed before the end
        os.remove(out / "cut" / name)
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"base {' '.join(flags)}\ncut\nfull\n")
    argv = [str(cfg), "--threads", "1", "--jobs", "2", "--resume", "--out-dir", str(out),
            "--results", str(results)]
    assert sweep.main(argv[:1] + ["--dry-run"] + argv[1:]) == 0
    sweep.main(argv)
    records = {r["label"]: r for r in records_of(results)}
    assert records["cut"]["resumed"] and not records["full"]["resumed"]
    assert records["cut"]["metrics"]["ff_loss"] == records["full"]["metrics"]["ff_loss"]
    assert records["cut"]["metrics"]["test_error"] == records["full"]["metrics"]["test_error"]
    log = (out / "cut.log").read_text()  # the first sitting's lines are kept
    assert "epoch   1/1" in log and "resuming" in log
    capsys.readouterr()
    sweep.main(argv)
    assert len(results.read_text().splitlines()) == 2
    assert capsys.readouterr().out.count("finished earlier") == 2


def test_the_local_cluster_gives_a_worker_a_run_only_when_it_is_free():
    """Saturation 1: Dask's default would queue a second run on a busy single-threaded
    worker, where it can wait behind a long run while another worker is idle."""
    client, cluster = sweep.connect(argparse.Namespace(scheduler=None, jobs=1))
    try:
        assert cluster.scheduler.WORKER_SATURATION == 1.0
    finally:
        client.close()
        cluster.close()
