"""Every way a run can go wrong ends in a correct run or in one line on stderr with a non-zero
exit status, and leaves nothing half-written; the run configuration is checked on
construction and --resume keeps it."""
import errno
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ff_hybrid_mnist as ff
import ff_label_mnist as ff_label
import ff_local_mnist as ff_local
import ff_runs
import make_ff_hybrid_mnist_gif as gif
import visualize_ff_hybrid_mnist as viz
from conftest import QUIET, TINY, TINY_NO_HEAD, one_line, run_cut_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny finished run of 2 epochs; tests copy it before they change anything."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert ff.main(TINY + ["--n-epochs", "2", "--out", str(out)]) == 0
    return out


def copy_of(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# -- configuration -----------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"goodness": "max"}, "--goodness max is not one of mean, sum"),
    ({"schedule": "parralel"}, "--schedule parralel is not one of"),
    ({"lr_decay": "cosine"}, "--lr-decay cosine"),
    ({"lr": 0.0}, "--lr 0.0 must be > 0"),
    ({"lr": float("nan")}, "must be a finite number"),
    ({"n_epochs": 2.5}, "must be an integer"),
    ({"top_k": 5}, "exceeds the 4 layers"),
    ({"seed": -1}, "--seed -1 must be >= 0"),
    ({"val_size": 60000}, "leaves none"),
    ({"n_train": 59000, "val_size": 2000}, "together exceed"),
    ({"layer_sizes": (785, 10)}, "must start with 784"),
])
def test_config_refuses_unknown_choices_and_out_of_range_values(change, words):
    with pytest.raises(ValueError) as e:
        ff.FFConfig(**change)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_cli_defaults_are_the_config_defaults():
    assert ff_runs.parse_args(["--out", "x"]).config == ff.FFConfig()
    assert ff.FFConfig().n_train == 60000 and ff.FFConfig(val_size=5000).n_train == 55000


def test_seed_minus_one_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        ff_runs.parse_args(["--seed", "-1"])
    assert e.value.code == 2 and "--seed -1" in capsys.readouterr().err


def test_the_configuration_is_stored_once_and_run_returns_it(tmp_path, finished):
    with open(finished / "args.json") as f:
        stored = json.load(f)
    run = ff_runs.load_run(str(finished))
    assert stored.pop("script") == "ff_hybrid_mnist.py"  # the script that made the run, and
    assert ff.FFConfig(**stored) == run.cfg == ff_runs.read_checkpoint_config(str(finished))[0]
    assert run.cfg.n_train == 600 and run.cfg.softmax_epochs == 2 and run.cfg.top_k == 2
    args = ff_runs.parse_args(TINY + ["--n-epochs", "0", "--out", str(tmp_path / "r")])
    result = ff_runs.run_experiment(args, log=lambda *a, **k: None)
    assert result.run_dir == str(tmp_path / "r") and result.config.n_epochs == 0
    assert result.metrics["ff_epochs"] == 0 and result.metrics["test_error"] is not None


# -- resume -----------------------------------------------------------------------------





def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path, finished, capsys):
    run = copy_of(finished, tmp_path)
    before = (run / "model.npz").stat().st_mtime_ns
    assert ff.main(["--resume", str(run), "--n-epochs", "1"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "--n-epochs 1" in err and "2 FF epochs" in err
    assert (run / "model.npz").stat().st_mtime_ns == before


@pytest.mark.parametrize("flag, value", [("--lr", "0.1"), ("--layer-sizes", "784,40,30"),
                                         ("--top-k", "3"), ("--refresh-inputs", None)])
def test_resume_refuses_a_flag_that_contradicts_the_run(finished, flag, value, capsys):
    argv = ["--resume", str(finished), flag] + ([value] if value else [])
    assert ff.main(argv + ["--dry-run"]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: {flag} ") and "contradicts" in err


def test_resume_accepts_the_runs_own_values_and_n_epochs(finished, capsys):
    argv = ["--resume", str(finished), "--lr", "0.03", "--n-train", "600", "--n-epochs", "5"]
    assert ff.main(argv + ["--dry-run"]) == 0
    assert '"n_epochs": 5' in capsys.readouterr().out


# -- divergence and silent layers -----------------------------------------------------

@pytest.mark.parametrize("flags, words", [(["--softmax-lr", "1e30"], "--softmax-lr"),
                                          (["--softmax-weight-decay", "1e6"], "--softmax-weight")])
def test_a_diverging_head_stops_with_one_line_and_writes_no_result(tmp_path, flags, words, capsys):
    out = tmp_path / "run"
    assert ff.main(TINY + ["--n-epochs", "1", "--out", str(out), *flags]) == 1
    err = one_line(capsys.readouterr().err)
    assert "softmax head" in err and re.search(r"head epoch \d", err) and words in err
    assert not (out / "model.npz").exists() and not (out / "metrics.json").exists()
    assert ff_runs.load_checkpoint(str(out))[1].epochs_done == 1  # the FF network is kept


@pytest.mark.parametrize("lr", ["1", "1000"])
def test_a_silent_layer_stops_the_run_naming_layer_epoch_and_cause(tmp_path, lr, capsys):
    # measured: at --lr 1 and 1000 every unit of every layer is 0 from epoch 2 on
    out = tmp_path / "run"
    assert ff.main(TINY + ["--n-epochs", "3", "--lr", lr, "--out", str(out)]) == 1
    err = one_line(capsys.readouterr().err)
    assert "layer 1 went silent in epoch 2" in err and f"--lr {float(lr)} too high" in err
    assert not (out / "metrics.json").exists()
    assert ff_runs.load_checkpoint(str(out))[1].epochs_done == 1


def test_json_is_strict_with_non_finite_values_as_null(tmp_path):
    path = tmp_path / "h.json"
    ff_runs.write_json(str(path), {"loss": [float("nan"), np.float32(np.inf), 1.5, None],
                              "n": np.int64(3)})

    def refuse(name):
        raise ValueError(name)
    with open(path) as f:
        assert json.load(f, parse_constant=refuse) == {"loss": [None, None, 1.5, None], "n": 3}


# -- output paths, full disk, damaged files, Ctrl-C -----------------------------------

def test_out_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_mkstemp = ff_runs.tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):  # a read-only folder (chmod does not stop root)
        if dir == str(readonly):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*a, dir=dir, **k)
    monkeypatch.setattr(ff_runs.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(ff, "load_mnist", lambda *a: pytest.fail("loaded data"))
    for out, words in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "below"),
                       (readonly / "run", "cannot write")):
        assert ff.main(TINY + ["--out", str(out)]) == 2
        assert words in one_line(capsys.readouterr().err)


def test_a_full_disk_at_the_final_save_keeps_the_checkpoint_to_resume(tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "run"
    real = ff_runs.write_json

    def full_disk(path, obj):
        if path.endswith("history.json"):  # after model.npz was written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, obj)
    monkeypatch.setattr(ff_runs, "write_json", full_disk)
    assert ff.main(TINY + ["--n-epochs", "1", "--out", str(out)]) == 1
    err = one_line(capsys.readouterr().err)
    assert "No space left" in err and f"--resume {out}" in err and "epoch 1 is kept" in err
    assert not (out / "metrics.json").exists()  # metrics.json, written last, marks a finished run
    with pytest.raises(ff.DataError, match="holds no finished run"):
        ff_runs.load_run(str(out))
    monkeypatch.setattr(ff_runs, "write_json", real)
    assert ff.main(["--resume", str(out)]) == 0
    assert ff_runs.load_run(str(out)).metrics["ff_epochs"] == 1


def test_damaged_checkpoint_or_missing_args_on_resume(tmp_path, finished, capsys):
    run = copy_of(finished, tmp_path)
    os.remove(run / "args.json")  # the checkpoint holds the whole configuration
    assert ff.main(["--resume", str(run), "--dry-run"]) == 0
    capsys.readouterr()
    (run / "checkpoint.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert ff.main(["--resume", str(run)]) == 1
    assert "checkpoint.npz is damaged" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["model.npz", "history.json"])
def test_visualiser_refuses_a_damaged_run_in_one_line(tmp_path, finished, name, capsys):
    run = copy_of(finished, tmp_path)
    with open(run / name, "r+b") as f:
        f.truncate(40)
    assert viz.main(["--run", str(run), "--outdir", str(tmp_path / "viz")]) == 1
    assert f"{name} is damaged" in one_line(capsys.readouterr().err)


def test_ctrl_c_says_how_to_continue_and_exits_130(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real, calls = ff.make_hybrid_batch, []

    def interrupted_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 15:  # 12 batches per epoch
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(ff, "make_hybrid_batch", interrupted_in_epoch_2)
    assert ff.main(TINY + ["--n-epochs", "3", "--out", str(out)]) == 130
    err = one_line(capsys.readouterr().err)
    assert f"epoch 1 is kept: --resume {out}" in err
    assert ff_runs.load_checkpoint(str(out))[1].epochs_done == 1


# -- run folders ----------------------------------------------------------------------

def test_default_run_folders_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folders = {ff_runs.parse_args([]).run_dir for _ in range(20)}
    assert len(folders) == 20
    assert all(re.fullmatch(r"runs/\d{8}-\d{6}-[0-9a-f]{4}", d) for d in folders)


# -- help -----------------------------------------------------------------------------

PARSERS = {"ff_hybrid_mnist.py": lambda: ff_runs.build_parser(ff.FFConfig),
           "ff_label_mnist.py": lambda: ff_runs.build_parser(ff_label.LabelConfig),
           "ff_local_mnist.py": lambda: ff_runs.build_parser(ff_local.LocalConfig),
           "visualize_ff_hybrid_mnist.py": viz.build_parser,
           "make_ff_hybrid_mnist_gif.py": gif.build_parser}


@pytest.mark.parametrize("script", PARSERS)
def test_help_shows_every_default(script):
    parser = PARSERS[script]()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert action.help and "%(default)" not in action.help, action.dest
    text = parser.format_help()
    for flag, default in (("--seed", "0"), ("--lr", "0.03"), ("--softmax-lr", "0.05"),
                          ("--softmax-weight-decay", "0.0001"), ("--schedule", "parallel"),
                          ("--lr-decay", "none"), ("--softmax-epochs", "50"), ("--top-k", "3")):
        assert re.search(re.escape(flag) + r" [A-Z_{].*?\(default:\s+" + re.escape(default),
                         text, re.S), flag


def test_each_figure_script_lists_only_what_it_accepts():
    assert "--resume" not in gif.build_parser().format_help()
    assert "--resume" in viz.build_parser().format_help()
    assert "TRAINS A WHOLE RUN FIRST" in " ".join(viz.build_parser().format_help().split())
    # their own flags come first, in their own group, before the training flags
    for module, own in ((viz, "--outdir"), (gif, "--snapshot-every")):
        text = module.build_parser().format_help()
        assert text.index(own) < text.index("--layer-sizes N,N,...\n")
    for script, parser in PARSERS.items():
        text = parser().format_help()
        assert text.count("(default: runs/") == 1 and "(default: )" not in text, script
    # each script lists its own flags, not another script's (those are refused, naming it)
    hybrid, label, local = (" ".join(PARSERS[s]().format_help().split()) for s in
                            ("ff_hybrid_mnist.py", "ff_label_mnist.py", "ff_local_mnist.py"))
    assert "--local" not in hybrid and "--hard-negatives" not in hybrid
    assert "--negatives" not in hybrid.replace("--hard-negatives", "")
    assert "--hard-negatives" in label and "--local" not in label
    assert "--local RF:STRIDE:CHANNELS,... " in local
    assert "(default: 10:6:128,2:1:220,2:1:512)" in local


# -- two processes, signals, leftovers -----------------------------------------------------

def start_training(out, *extra):
    """The training CLI as a real process, long enough to be caught running."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "ff_hybrid_mnist.py")] + TINY_NO_HEAD
                            + ["--n-epochs", "400", "--softmax-epochs", "0", "--out", str(out),
                               *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for(path, process, timeout=60):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_second_process_on_the_same_folder_is_refused_and_sigterm_keeps_the_checkpoint(
        tmp_path):
    out = tmp_path / "run"
    first = start_training(out)
    try:
        wait_for(out / "checkpoint.npz", first)
        second = subprocess.run([sys.executable, os.path.join(ROOT, "ff_hybrid_mnist.py")]
                                + TINY + ["--out", str(out)], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 2
        err = one_line(second.stderr)
        assert "already holds a run" in err or f"process {first.pid}" in err
        resumed = subprocess.run([sys.executable, os.path.join(ROOT, "ff_hybrid_mnist.py"),
                                  "--resume", str(out)], capture_output=True, text=True,
                                 timeout=60)
        assert resumed.returncode == 2
        assert f"in use by another run (process {first.pid})" in one_line(resumed.stderr)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 143
        err = one_line(first.stderr.read())
        assert err.startswith("error: terminated; the checkpoint after epoch")
        assert f"--resume {out} continues from it" in err
    finally:
        if first.poll() is None:
            first.kill()
    assert not (out / "metrics.json").exists()
    (out / ".tmp-left-by-a-killed-write").write_bytes(b"half")
    done = ff_runs.load_checkpoint(str(out))[1].epochs_done
    assert ff.main(["--resume", str(out), "--n-epochs", str(done + 1)]) == 0
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert ff_runs.load_run(str(out)).metrics["ff_epochs"] >= 2


def test_a_run_started_in_a_folder_another_process_just_filled_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ff_runs.parse_args(TINY + ["--n-epochs", "1", "--out", str(out)])
    assert ff.main(TINY + ["--n-epochs", "1", "--out", str(out)]) == 0  # the other process
    capsys.readouterr()
    with pytest.raises(ff_runs.SettingsError, match="already holds a run"):
        ff_runs.run_experiment(args, **QUIET)


# -- input that used to give a traceback or be ignored ------------------------------------

def test_a_network_too_big_for_the_machine_is_refused_before_anything_is_allocated(capsys):
    assert ff.main(["--layer-sizes", "784,200000,200000,200000", "--dry-run"]) == 2
    err = one_line(capsys.readouterr().err)
    assert re.search(r"needs about \d+ GiB for weights, optimiser state and buffers; this "
                     r"machine has \d+ GiB", err)
    assert ff.main(["--dry-run", "--out", "x"]) == 0
    assert re.search(r"memory_gib: \d+\.\d+", capsys.readouterr().out)


@pytest.mark.parametrize("config, change, words", [
    (ff_label.LabelConfig, {"hard_head_lr": 0.5}, "--hard-head-lr 0.5 needs --hard-from head"),
    (ff_label.LabelConfig, {"hard_negatives": True, "hard_from": "head",
                            "hard_head_weight_decay": 0.01},
     "needs --hard-from head and --optimizer sgd"),
    (ff_label.LabelConfig, {"n_blur": 3}, "--n-blur 3 is unused: label negatives have no mask"),
    (ff.FFConfig, {"peer_kind": "author"}, "--peer-kind author needs --peer-norm above 0"),
    (ff.FFConfig, {"seed": 2 ** 70}, "below 2^63"),
    (ff.FFConfig, {"lr": float("inf")}, "--lr inf must be a finite number"),
])
def test_a_flag_that_would_be_ignored_or_cannot_work_is_refused(config, change, words):
    with pytest.raises(ValueError) as e:
        config(**change)
    assert words in str(e.value)


@pytest.mark.parametrize("flags, script", [
    (["--goodness-layer1"], "ff_label_mnist.py"),
    (["--hard-head-lr", "0.5"], "ff_label_mnist.py"),
    (["--hard-negatives"], "ff_label_mnist.py"),
    (["--local", "10:6:4"], "ff_local_mnist.py"),
])
def test_a_flag_of_another_experiment_is_refused_naming_its_script(flags, script, capsys):
    """ff_hybrid_mnist.py's configuration has no label or local fields: their flags would
    be ignored, so each is refused, naming the script that has it."""
    with pytest.raises(SystemExit) as e:
        ff.main(TINY + flags + ["--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2
    assert f"{flags[0]} is not a flag of " in err and f"it belongs to {script}" in err
    with pytest.raises(TypeError):  # nor can a configuration of the hybrid run hold it
        ff.FFConfig(**{flags[0][2:].replace("-", "_"): True})


def test_an_overflowing_loss_names_the_setting_out_of_range():
    assert "--threshold 1e+308" in ff_runs.likely_cause(ff.FFConfig(threshold=1e308))
    assert "--peer-norm 1e+300" in ff_runs.likely_cause(ff.FFConfig(peer_norm=1e300))
    with pytest.raises(ValueError, match="--weight-decay 10000000000.0 times --lr 0.03 is at least 1"):
        ff.FFConfig(weight_decay=1e10)
    assert "try a lower --lr" in ff_runs.likely_cause(ff.FFConfig())


def test_a_diverging_hard_negative_head_stops_in_one_line(tmp_path, capsys):
    flags = TINY + ["--hard-negatives", "--hard-from", "head",
                    "--hard-head-lr", "1e30", "--n-epochs", "2", "--out", str(tmp_path / "r")]
    assert ff_label.main(flags) == 1
    assert "--hard-head-lr" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("document, change, words", [
    ("history.json", lambda h: h["ff"].update(loss="six"), "ff.loss is not a list"),
    ("history.json", lambda h: h["ff"]["loss"][0].pop(), "a row of 2 values for 3 layers"),
    ("metrics.json", lambda m: m.update(test_error="six"), "test_error is 'six'"),
])
def test_figures_of_a_damaged_run_are_refused_before_any_png(tmp_path, finished, document,
                                                             change, words, capsys):
    run = copy_of(finished, tmp_path)
    doc = json.loads((run / document).read_text())
    change(doc)
    (run / document).write_text(json.dumps(doc))
    assert viz.main(["--run", str(run), "--outdir", str(tmp_path / "figs")]) == 1
    err = one_line(capsys.readouterr().err)
    assert document in err and words in err
    assert not (tmp_path / "figs").exists() or not os.listdir(tmp_path / "figs")


def test_figure_scripts_write_into_the_run_folder_unless_told(tmp_path, finished, capsys):
    assert viz.main(["--run", str(finished), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["outdir"] == os.path.join(str(finished),
                                                                         "figures")
    assert gif.main(TINY + ["--out", str(tmp_path / "g"), "--dry-run"]) == 0
    assert f'gif: "{tmp_path / "g" / "training.gif"}"' in capsys.readouterr().out
    assert viz.main(TINY + ["--out", str(tmp_path / "v"), "--dry-run"]) == 0
    assert f'outdir: "{tmp_path / "v" / "figures"}"' in capsys.readouterr().out


def test_the_gif_script_refuses_what_it_would_draw_wrongly(tmp_path, capsys):
    assert gif.main(TINY + ["--out", str(tmp_path / "g"), "--dry-run", "--n-eval", "20000"]) == 2
    assert "exceeds the 10000 test digits" in one_line(capsys.readouterr().err)
    # its frames show hybrids: a label run's flags are refused by its own name, naming the
    # script whose runs the visualiser draws
    for flags in (["--negatives", "label"], ["--hard-negatives"]):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "make_ff_hybrid_mnist_gif.py"),
                               *TINY, "--out", str(tmp_path / "g"), "--dry-run", *flags],
                              capture_output=True, text=True, timeout=120)
        err = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert f"{flags[0]} is not a flag of make_ff_hybrid_mnist_gif.py" in err
        assert "ff_label_mnist.py" in err
    assert not (tmp_path / "g").exists()


def test_the_gif_script_does_not_advise_a_flag_it_lacks(finished, capsys):
    assert gif.main(TINY + ["--out", str(finished)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "already holds a run" in err and "--resume" not in err


# -- the experiment scripts -----------------------------------------------------------------

def run_script(module, *args, **popen):
    """python3 -m experiments.MODULE ARGS, run from the repository root as the docs run it."""
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, **popen)


@pytest.mark.parametrize("content, words", [
    (None, "cannot be read"), ("not json\n", "not a JSON record"),
    ("\n\n", "no finished run"), ('{"label": "a", "rc": 1}\n', "no finished run"),
])
def test_summaries_and_plots_refuse_unusable_results_in_one_line(tmp_path, content, words,
                                                                capsys):
    """In this process (the next test runs one as a command): exit status 1, one line."""
    path = tmp_path / "results.jsonl"
    if content is not None:
        path.write_text(content)
    for script in ("summarize", "plot_threshold_sweep", "plot_blur_sweep"):
        extra = [] if script == "summarize" else ["--out", str(tmp_path / "plot.png")]
        module = importlib.import_module(f"experiments.sweeps.{script}")
        assert module.main([str(path), *extra]) == 1, script
        err = capsys.readouterr().err
        assert words in one_line(err) or "need at least two" in err, script
    assert not (tmp_path / "plot.png").exists()


def test_a_plot_into_a_missing_folder_is_refused(tmp_path):
    done = run_script("sweeps.plot_blur_sweep", os.path.join(ROOT, "experiments", "results",
                                                             "sweep-val-blur.jsonl"),
                      "--out", tmp_path / "no" / "plot.png")
    assert done.returncode == 1 and "does not exist" in one_line(done.stderr)


def test_refit_head_of_a_diverging_head_or_damaged_data_is_one_line(tmp_path, finished):
    done = run_script("analyses.refit_head", "--run", finished, "--head", "sgd",
                      "--softmax-lr", "1e30", "--softmax-epochs", "1")
    assert done.returncode == 1 and "softmax head's loss" in one_line(done.stderr.splitlines()[-1] + "\n")
    bad = tmp_path / "mnist"
    bad.mkdir()
    for name, _ in ff.MNIST_FILES.values():
        (bad / name).write_bytes(b"\x00\x00\x08\x03 damaged")
    done = run_script("analyses.refit_head", "--run", finished,
                      env={**os.environ, "MNIST_DIR": str(bad)})
    assert done.returncode == 1 and "SHA-256" in one_line(done.stderr)


def test_a_run_names_the_commit_it_started_with(tmp_path, monkeypatch):
    """A long run's files name the code it ran, not the commit checked out when it ends."""
    commits = iter(["started-here"] + ["checked-out-later"] * 10)
    monkeypatch.setattr(ff_runs, "code_commit", lambda: next(commits))
    assert ff.main(TINY + ["--n-epochs", "1", "--out", str(tmp_path / "r")]) == 0
    assert ff_runs.load_run(str(tmp_path / "r")).environment["commit"] == "started-here"


# -- third round: flags that would be stored and ignored, finished and extended runs -------

@pytest.mark.parametrize("main, flags, words", [
    (ff_label.main, ["--n-blur", "3"], "--n-blur"),
    (ff_label.main, ["--n-blur", "6"], "--n-blur is given but unused"),  # at its default
    (ff.main, ["--softmax-epochs", "0", "--head", "sgd", "--softmax-lr", "5"], "--softmax-lr"),
    (ff.main, ["--softmax-epochs", "0", "--head", "sgd"], "--head is given but unused"),
    (ff.main, ["--schedule", "greedy", "--refresh-inputs"], "--refresh-inputs"),
    (ff_label.main, ["--hard-head-lr", "0.1"], "--hard-head-lr"),
    (ff_label.main, ["--hard-negatives", "--hard-head-lr", "0.1"], "--hard-head-lr"),
    (ff.main, ["--peer-kind", "spread"], "--peer-kind"),
    (ff.main, ["--weight-decay", "100", "--lr", "0.03"], "--weight-decay"),
])
def test_a_flag_the_run_would_ignore_or_a_flipping_decay_is_refused(main, flags, words, capsys):
    try:
        status = main(TINY + flags + ["--dry-run"])
    except SystemExit as e:  # a value the parser refuses: its usage, then the one line
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert words.strip() in err and ("unused" in err or "needs" in err or "at least 1" in err
                                     or "does nothing" in err)


def test_resuming_a_finished_run_rewrites_nothing(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    before = {n: (run / n).read_bytes() for n in ("metrics.json", "model.npz", "history.json")}
    assert ff.main(["--resume", str(run)]) == 0
    assert "is finished after 2 FF epochs; nothing to do" in capsys.readouterr().out
    assert {n: (run / n).read_bytes() for n in before} == before


def test_an_extended_run_reads_as_unfinished_until_it_finishes(finished, tmp_path):
    run = copy_of(finished, tmp_path)

    def stop(epoch, state):
        raise KeyboardInterrupt
    with pytest.raises(ff_runs.RunInterrupted):
        ff_runs.run_experiment(ff_runs.parse_args(["--resume", str(run), "--n-epochs", "4"]),
                          callback=stop, **QUIET)
    assert not (run / "metrics.json").exists()
    with pytest.raises(ff.DataError, match="metrics.json not found"):
        ff_runs.load_run(str(run))
    assert ff.main(["--resume", str(run), "--n-epochs", "4"]) == 0
    assert ff_runs.load_run(str(run)).metrics["ff_epochs"] == 4


def test_ctrl_c_between_checkpoints_says_what_finished_and_what_was_kept(tmp_path, capsys):
    out = tmp_path / "run"

    def stop(epoch, state):
        if epoch + 1 == 2:
            raise KeyboardInterrupt
    args = ff_runs.parse_args(TINY + ["--n-epochs", "5", "--out", str(out)])
    args.checkpoint_every = 10
    with pytest.raises(ff_runs.RunInterrupted) as e:
        ff_runs.run_experiment(args, callback=stop, **QUIET)
    assert "2 epochs finished but none was checkpointed yet (--checkpoint-every 10)" in str(e.value)


def test_main_gives_back_the_callers_sigterm_handler(tmp_path):
    mine = lambda signum, frame: None
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert ff.main(TINY + ["--n-epochs", "1", "--out", str(tmp_path / "run")]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_checkpoint_of_the_older_format_resumes_exactly(tmp_path):
    # the layout of checkpoints written before --optimizer existed: Adam's state as adam_*
    ref, old = tmp_path / "ref", tmp_path / "old"
    flags = TINY_NO_HEAD + ["--softmax-epochs", "0"]
    run_cut_after(ref, flags + ["--n-epochs", "2"])
    shutil.copytree(ref, old)
    with np.load(old / "checkpoint.npz") as z:
        arrays = {k.replace("opt_", "adam_", 1) if k.startswith("opt_") else k: z[k] for k in z}
    np.savez(old / "checkpoint.npz", **arrays)
    for run in (ref, old):
        assert ff.main(["--resume", str(run)]) == 0
    a, b = ff_runs.load_run(str(ref)), ff_runs.load_run(str(old))
    for Wa, Wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(Wa, Wb)
