"""What makes a run safe, resumable and traceable, for every experiment script: the errors
the command line prints as one line, the options of a configuration dataclass and their
checks, run folders and their lock, atomic writes, checkpoints and resume, the saved run and
load_run, the memory estimate, the environment record, SIGTERM and Ctrl-C, and the command
line built from a configuration dataclass. The algorithm is in ff_hybrid_mnist.py (which
imports this module, so the functions here that need it import it when they run); the
device fast paths are in ff_devices.py.
"""

import argparse
import dataclasses
import datetime
import fcntl
import functools
import gzip
import hashlib
import importlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field

import numpy as np

import ff_devices
from ff_devices import gpu_problem, to_host


# -----------------------------------------------------------------------------
# Errors a user can act on: the CLI prints each as one line

class DataError(Exception):
    """A data or file problem the user can fix; the CLI prints it as one line and exits 1."""


class SettingsError(Exception):
    """Flags that cannot work together (an output path that cannot be written, a flag that
    conflicts with the run being resumed); the CLI prints it as one line and exits 2."""


class TrainingDiverged(RuntimeError):
    """Training that cannot succeed: a NaN or infinite loss, or a layer whose units all went
    silent; the CLI prints it as one line and exits 1."""



class RunInterrupted(Exception):
    """Ctrl-C (exit status 130) or SIGTERM (143) during a run; the CLI prints what was kept
    and how to continue as one line."""

    def __init__(self, message, status=130):
        super().__init__(message)
        self.status = status


class Terminated(KeyboardInterrupt):
    """SIGTERM (what timeout, batch schedulers and docker stop send), handled like Ctrl-C."""


def raise_terminated(signum, frame):
    raise Terminated



# -----------------------------------------------------------------------------
# Watching a run: the epoch's sums, a loss that diverged, a layer gone silent, the progress line

def epoch_sums(losses, goodnesses, n_pos, thresholds):
    """An epoch's sums over its batches, per layer: the loss, the accuracy of telling
    positives from negatives at the layer's threshold, and the batches in which any unit of
    the layer was on; from the epoch's (batch, layer) losses and (batch, layer, row)
    goodnesses (host arrays), each batch's row added in batch order."""
    threshold = np.asarray(thresholds, np.float32)[:, None]  # compared in float32, as g is
    accuracy = ((goodnesses[:, :, :n_pos] > threshold).mean(axis=2)
                + (goodnesses[:, :, n_pos:] < threshold).mean(axis=2)) / 2
    sums = np.zeros((losses.shape[1], 3))
    for row in np.stack([losses, accuracy, goodnesses.max(axis=2) > 0], axis=2):
        sums += row
    return sums


def check_loss(cfg, loss, epoch, l, batch=None):
    """TrainingDiverged for a NaN or infinite loss: a batch's on the CPU, an epoch's sum on
    the GPU (reading a value back every step would stall it)."""
    if not np.isfinite(loss):
        where = f"epoch {epoch + 1}, layer {l + 1}" + ("" if batch is None else f", batch {batch + 1}")
        raise TrainingDiverged(f"FF loss is {loss} in {where}; {likely_cause(cfg)}")


def likely_cause(cfg):
    """The settings that could have made the loss overflow: those far outside the range the
    experiments use, else the learning rate (a weight decay that flips the weights is refused
    before training)."""
    far = [f"{flag(name)} {shown(getattr(cfg, name))}" for name, limit in
           (("threshold", 1e3), ("peer_norm", 1e2), ("lr", 1.0)) if getattr(cfg, name) > limit]
    if far:
        return "out of the usual range: " + ", ".join(far)
    return f"try a lower --lr (now {cfg.lr})"


def check_silent(cfg, sums, trained, epoch):
    """A silent layer has no gradient (ReLU), so it stays silent for good. (A test of
    "accuracy at chance and loss not falling" was measured to stop tiny runs that were still
    learning, so only this certain case stops a run.)"""
    for l in trained:
        if sums[l, 2] == 0:
            cause = (f"--lr {cfg.lr} too high" + (f" or --weight-decay {cfg.weight_decay}"
                                                  if cfg.weight_decay else ""))
            raise TrainingDiverged(
                f"layer {l + 1} went silent in epoch {epoch + 1}: every unit was 0 on every "
                f"batch, so it cannot learn again; likely cause {cause}")


def record_epoch(history, means, n_active, seconds):
    """Appends an epoch's per-layer means; None for a layer above the n_active that ran this
    epoch (greedy) or a NaN, so JSON holds no NaN."""
    for key, column in (("loss", means[:, 0]), ("accuracy", means[:, 1])):
        history[key].append([float(v) if l < n_active and np.isfinite(v) else None
                             for l, v in enumerate(column)])
    history["seconds"].append(seconds)


def finish_epoch(cfg, state, losses, goodnesses, trained, n_active, epoch, clock, log):
    """The end of an FF epoch: its steps' losses and goodness (host arrays, (n_batches,
    n_layers) and (n_batches, n_layers, 2B)) summed and checked (TrainingDiverged, then
    silent layers), recorded in state.history, and one progress line. clock: (the epoch's
    start, the run's start, the epoch it started from)."""
    t0, t_start, start_epoch = clock
    n_batches, epochs = len(losses), core().total_epochs(cfg)
    sums = epoch_sums(losses, goodnesses, cfg.batch_size,
                      [cfg.layer_threshold(n) for n in cfg.layer_sizes[1:]])
    for l in trained:
        check_loss(cfg, sums[l, 0], epoch, l)
    record_epoch(state.history, sums / n_batches, n_active, time.perf_counter() - t0)
    state.epochs_done = epoch + 1
    elapsed = time.perf_counter() - t_start
    log(progress_line(cfg, state.history, epoch, elapsed,
                      eta=elapsed / (epoch + 1 - start_epoch) * (epochs - epoch - 1)), flush=True)
    check_silent(cfg, sums, trained, epoch)


def progress_line(cfg, history, epoch, elapsed, eta):
    def row(values, fmt):
        return " ".join("  -  " if v is None else fmt(v) for v in values)
    return (f"epoch {epoch + 1:3d}/{core().total_epochs(cfg)}  FF loss per layer "
            + row(history["loss"][-1], lambda v: f"{v:.3f}")
            + f"  {cfg.ACCURACY_NAME} accuracy per layer (%) "
            + row(history["accuracy"][-1], lambda v: f"{100 * v:.1f}")
            + (f"  hard-negative head error {100 * history['head_error'][-1]:.1f}%"
               if history.get("head_error") else "")
            + f"  {history['seconds'][-1]:.1f} s  elapsed {elapsed:.0f} s  eta {eta:.0f} s")


def check_head_loss(loss, epoch, lr, weight_decay):
    """TrainingDiverged when the SGD softmax head's loss is NaN or infinite."""
    if not math.isfinite(float(loss)):
        raise TrainingDiverged(
            f"the softmax head's loss is {float(loss)} in head epoch {epoch + 1}; lower "
            f"--softmax-lr (now {lr:g}) or --softmax-weight-decay (now {weight_decay:g})")


def head_progress_line(hist, epoch, n_epochs):
    """The SGD head's progress: its loss, running training error and validation error."""
    val = f"  val error {100 * hist['val_error'][-1]:.2f}%" if "val_error" in hist else ""
    return (f"softmax epoch {epoch + 1:3d}/{n_epochs}  loss {hist['loss'][-1]:.4f}  "
            f"running train error {100 * hist['train_error'][-1]:.2f}%{val}")


def head_fit_line(hist, chosen_on):
    """One converged fit of the head: iterations, largest gradient, the choice's error."""
    return (f"converged head, C {hist['C']:g}: {hist['iterations']} iterations, largest "
            f"gradient {hist['grad_max']:.1e}{'' if hist['converged'] else ' (NOT converged)'}"
            f", error on {chosen_on} {100 * hist['choice_error']:.2f}%")


# -----------------------------------------------------------------------------
# Options: a field of a configuration dataclass and its flag, declared together

def option(default, help, choices=None, low=None, above=False, metavar=None, default_text=None,
           check=None):
    """A field of a configuration dataclass and its command-line flag, declared together: the
    help text and the single-value rules (choices, or a lower bound: >= low, or > low with
    above; check(value) raises ValueError for a value of the right type that cannot work)."""
    return field(default=default, metadata=dict(help=help, choices=choices, low=low,
                                                above=above, metavar=metavar,
                                                default_text=default_text, check=check))


def flag(name):
    return "--" + name.replace("_", "-")


def shown(value):
    """A value as it is written on the command line."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_option(config_class, name, value):
    """ValueError, one line naming the flag, when `value` breaks the rules that the field
    `name` of config_class declares (its type, choices, lower bound, check); the command line
    applies the same rules to what it parses."""
    f = config_class.__dataclass_fields__[name]
    meta, kind = f.metadata, f.type

    def refuse(why):
        raise ValueError(f"{flag(name)} {shown(value)} {why}")
    if value is None and f.default is None:
        return
    if kind is bool and not isinstance(value, (bool, np.bool_)):
        refuse("must be true or false")
    if kind is tuple:  # the layer sizes
        if (len(value) < 2 or value[0] != 784
                or not all(isinstance(n, (int, np.integer)) for n in value)):
            refuse("must start with 784 (the input) and have at least one layer, e.g. "
                   "784,1000,1000,1000,1000")
        if min(value) < 1:
            refuse("every layer needs at least 1 unit")
    if kind in (int, float):
        if kind is int and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            refuse("must be an integer")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            refuse("must be a number")
        if kind is int and abs(int(value)) >= 2 ** 63:
            refuse("is too large: it must be below 2^63")
        if not math.isfinite(value):
            refuse("must be a finite number")
        low, above = meta["low"], meta["above"]
        if low is not None and (value < low or (above and value == low)):
            refuse(f"must be {'>' if above else '>='} {low}")
    if meta["choices"] is not None and value not in meta["choices"]:
        refuse(f"is not one of {', '.join(meta['choices'])}")
    if meta["check"] is not None:
        meta["check"](value)

def check_config(cfg, n_train_max):
    """A configuration's checks on construction (its __post_init__): every field against its
    option's rules, the fields that follow from others (cfg.derive(), n_train), then the
    rules across fields (cfg.rules()); ValueError, one line naming the flag."""
    cfg.layer_sizes = tuple(cfg.layer_sizes)
    for name in cfg.__dataclass_fields__:
        check_option(type(cfg), name, getattr(cfg, name))
    cfg.derive()
    if cfg.val_size >= n_train_max:
        raise ValueError(f"--val-size {cfg.val_size} leaves none of the {n_train_max} "
                         "training digits to train on")
    if cfg.n_train is None:
        cfg.n_train = n_train_max - cfg.val_size
    for name, broken, why in cfg.rules():
        if broken:
            value = getattr(cfg, name)
            raise ValueError(f"{flag(name)}{'' if isinstance(value, bool) else ' ' + shown(value)}"
                             f" {why}")


# -----------------------------------------------------------------------------
# MNIST's IDX files: find, decompress, check (ff_hybrid_mnist.load_mnist reads them)

HOW_TO_SUPPLY = ("put the four MNIST *-ubyte.gz files in a folder and pass it with "
                 "--data-dir DIR or the MNIST_DIR environment variable")
GZIP_MAGIC = b"\x1f\x8b"


def find_idx_file(folder, name):
    """The path of `name` or `name.gz` in folder, or None."""
    for candidate in (name + ".gz", name):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def read_idx_bytes(path):
    """Raw decompressed bytes of an IDX file, gzip or not (sniffed by its magic)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == GZIP_MAGIC:
            return gzip.decompress(raw)
        if path.endswith(".gz"):
            raise DataError(f"{path}: not a gzip archive")
        return raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot be read or decompressed ({e.__class__.__name__}: {e})")


def parse_idx(data, path, is_images):
    """uint8 array from IDX bytes; checks magic number, dimensions and count."""
    want_magic, want_ndim = (0x803, 3) if is_images else (0x801, 1)
    if len(data) < 4 or int.from_bytes(data[:4], "big") != want_magic:
        got = data[:4].hex() if len(data) >= 4 else "nothing"
        raise DataError(f"{path}: wrong IDX magic number {got}, expected {want_magic:08x} "
                        f"({'images' if is_images else 'labels'})")
    header = 4 + 4 * want_ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(want_ndim)]
    if is_images and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    if len(data) - header != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims[0]} items but the file holds "
                        f"{len(data) - header} bytes of data instead of {int(np.prod(dims))} "
                        "(truncated or padded)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_idx(path, sha256, is_images):
    data = read_idx_bytes(path)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise DataError(f"{path}: SHA-256 of the decompressed file is {got[:16]}..., "
                        f"expected {sha256[:16]}...; the file is damaged or not canonical MNIST")
    return parse_idx(data, path, is_images)

def read_idx_files(files, folders):
    """{role: uint8 array} of files (role -> (name, SHA-256)), read from the first folder
    given in folders, a list of (folder or None, where it came from); every file checked."""
    folder, where = next(((d, src) for d, src in folders if d), (None, None))
    if folder is None:
        raise DataError("no MNIST folder given and no copy in the repository; " + HOW_TO_SUPPLY)
    missing = [name for name, _ in files.values() if not find_idx_file(folder, name)]
    if missing:
        raise DataError(f"{where} folder {folder} lacks {', '.join(missing)} (.gz or raw); "
                        + HOW_TO_SUPPLY)
    arrays = {}
    for role, (name, sha256) in files.items():
        try:
            arrays[role] = load_idx(find_idx_file(folder, name), sha256,
                                    is_images=role.endswith("images"))
        except DataError as e:
            raise DataError(f"{e}; replace it with a good copy ({HOW_TO_SUPPLY})")
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[split + "_images"]), len(arrays[split + "_labels"])
        if n_img != n_lab:
            raise DataError(f"{folder}: {split} set has {n_img} images but {n_lab} labels")
    return arrays


# -----------------------------------------------------------------------------
# Run files: model.npz, history.json, metrics.json (written last), checkpoint.npz

def code_commit():
    """The git commit of this file's repository, "-dirty" if tracked code differs from it
    (results, figures and prose do not count); None outside a git checkout. Stored with
    every result so that it can be traced."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain",
                                "--untracked-files=no", "--", ".", ":!experiments/results",
                                ":!viz", ":!*.md"], capture_output=True, text=True).stdout
        return head + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device="cpu"):
    env = {"device": device, "commit": code_commit(), "python": platform.python_version(),
           "numpy": np.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "cpu": platform.processor()}
    if device == "gpu":
        cupy = ff_devices.cupy
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        env.update(gpu=name.decode() if isinstance(name, bytes) else name, cupy=cupy.__version__,
                   cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                   cuda_driver=cupy.cuda.runtime.driverGetVersion())
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        from threadpoolctl import threadpool_info
        env["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "num_threads",
                                                  "architecture")} for i in threadpool_info()]
    except ImportError:
        config = np.show_config(mode="dicts") if np.lib.NumpyVersion(np.__version__) >= "1.26.0" else {}
        env["blas"] = config.get("Build Dependencies", {}).get("blas", {}).get("name")
    return env


def peak_rss_mib():
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 ** 2 if sys.platform == "darwin" else 1024)


def atomic_write(path, write):
    """write(file) into a temporary file beside path, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a result file is not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def finite_or_none(obj):
    """obj as plain JSON values, every NaN or infinity replaced by None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path, obj):
    text = json.dumps(finite_or_none(obj), indent=1, allow_nan=False, default=str)
    atomic_write(path, lambda f: f.write(text.encode()))


READ_ERRORS = (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile)


def damaged_error(path, e):
    detail = (str(e).splitlines() or [""])[0]
    return DataError(f"{path} is damaged or not written by this suite "
                     f"({e.__class__.__name__}: {detail})")


def core():
    """ff_hybrid_mnist, the algorithm: it imports this module, so the functions here that
    need it (to make a run's state, to train) import it when they run."""
    return importlib.import_module("ff_hybrid_mnist")


SCRIPTS = {  # the experiment scripts: file -> (module, its configuration class)
    "ff_hybrid_mnist.py": ("ff_hybrid_mnist", "FFConfig"),
    "ff_label_mnist.py": ("ff_label_mnist", "LabelConfig"),
    "ff_local_mnist.py": ("ff_local_mnist", "LocalConfig"),
    "ff_recurrent_mnist.py": ("ff_recurrent_mnist", "RecurrentConfig"),
}


def config_class(script):
    """The configuration class of an experiment script (a key of SCRIPTS)."""
    if script not in SCRIPTS:
        raise ValueError(f"no experiment script {script!r}; the scripts are "
                         + ", ".join(SCRIPTS))
    module, name = SCRIPTS[script]
    return getattr(importlib.import_module(module), name)


def config_record(cfg):
    """What a run stores of its configuration: the script that ran it and every field."""
    return {"script": cfg.SCRIPT, **asdict(cfg)}


def script_of(raw):
    """The script of a stored configuration: its own record, or for a run saved before the
    scripts were split (one configuration for every experiment), the one its fields name."""
    if "script" in raw:
        return raw["script"]
    label, local = raw.get("negatives") == "label", bool(raw.get("local"))
    if label and local:
        raise ValueError("label negatives with locally-connected layers: no script runs that")
    return ("ff_label_mnist.py" if label else "ff_local_mnist.py" if local
            else "ff_hybrid_mnist.py")


def run_config(raw):
    """The configuration stored in a run's checkpoint or model, of its script's class (a field
    added since the run was saved takes its default, except the head: a run saved before the
    converged head existed had the SGD head; the fields of other experiments that an old run
    stored, all at their defaults, are left out)."""
    raw = {"head": "sgd", **raw}
    cls = config_class(script_of(raw))
    return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


def save_checkpoint(run_dir, cfg, state):
    arrays = {"epochs_done": state.epochs_done,
              "rng_state": json.dumps(state.rng.bit_generator.state),
              "config": json.dumps(config_record(cfg)), "history": json.dumps(state.history)}
    for l, (W, b) in enumerate(zip(state.weights, state.biases)):
        arrays.update({f"W{l}": to_host(W), f"b{l}": to_host(b),
                       f"peer{l}": to_host(state.peer_means[l])})
        for name, opt in (("W", state.opt_w[l]), ("b", state.opt_b[l])):
            arrays.update({f"opt_{name}{l}_{k}": to_host(v)
                           for k, v in opt.state_arrays().items()})
    if state.head is not None:
        arrays.update(head_W=to_host(state.head[0]), head_b=to_host(state.head[1]))
    for name, opt in zip("Wb", state.head_opt or []):
        arrays.update({f"opt_head_{name}_{k}": to_host(v) for k, v in opt.state_arrays().items()})
    atomic_write(os.path.join(run_dir, "checkpoint.npz"), lambda f: np.savez(f, **arrays))


def checkpoint_path(run_dir):
    path = os.path.join(run_dir, "checkpoint.npz")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: nothing to resume")
    return path


def read_checkpoint_config(run_dir):
    """(cfg, epochs_done) of the checkpoint in run_dir, without loading the network."""
    path = checkpoint_path(run_dir)
    try:
        with np.load(path) as z:
            return run_config(json.loads(str(z["config"]))), int(z["epochs_done"])
    except READ_ERRORS as e:
        raise damaged_error(path, e) from None


def load_checkpoint(run_dir):
    """(cfg, state) saved after the last finished epoch of the run in run_dir."""
    path = checkpoint_path(run_dir)
    try:
        with np.load(path) as z:
            cfg = run_config(json.loads(str(z["config"])))
            rng = np.random.default_rng()
            rng.bit_generator.state = json.loads(str(z["rng_state"]))
            state = core().FFState.fresh(cfg, np.random.default_rng(0))
            state.rng, state.epochs_done = rng, int(z["epochs_done"])
            state.history = json.loads(str(z["history"]))
            for l, kind in enumerate(cfg.layer_kinds()):
                state.weights[l][...] = stored(kind, z[f"W{l}"])
                state.biases[l][...] = z[f"b{l}"]
                state.peer_means[l][...] = z[f"peer{l}"]
                for name, opt in (("W", state.opt_w[l]), ("b", state.opt_b[l])):
                    # "adam_": the keys of checkpoints written before --optimizer existed
                    prefix = "opt" if f"opt_{name}{l}_{next(iter(opt.state_arrays()))}" in z \
                        else "adam"
                    opt.load_state(**{k: stored(kind, z[f"{prefix}_{name}{l}_{k}"])
                                      for k in opt.state_arrays()})
            if state.head is not None:
                state.head[0][...], state.head[1][...] = z["head_W"], z["head_b"]
            for name, opt in zip("Wb", state.head_opt or []):
                opt.load_state(**{k: z[f"opt_head_{name}_{k}"] for k in opt.state_arrays()})
    except READ_ERRORS as e:
        raise damaged_error(path, e) from None
    return cfg, state


def stored(kind, a):
    """A layer's weights (or their optimiser state) as read from a file, in the layer kind's
    form (a dense layer's: as stored)."""
    return a if kind is None else kind.stored(a)


RUN_FILES = ("model.npz", "history.json", "metrics.json")


def save_run(run_dir, cfg, state, head, softmax_history, metrics, env=None):
    """model.npz, history.json, then metrics.json, each written whole under a temporary name
    and renamed: a folder holds a finished run exactly when it holds metrics.json."""
    arrays = {"layer_sizes": np.array(cfg.layer_sizes),
              "config": json.dumps(config_record(cfg))}
    for l, (W, b) in enumerate(zip(state.weights, state.biases)):
        arrays.update({f"W{l}": to_host(W), f"b{l}": to_host(b)})
    if head is not None:
        arrays.update({"softmax_W": to_host(head[0]), "softmax_b": to_host(head[1])})
    history = {"ff": state.history, "softmax": softmax_history, "config": config_record(cfg),
               "environment": env or environment(cfg.device)}
    atomic_write(os.path.join(run_dir, "model.npz"), lambda f: np.savez(f, **arrays))
    write_json(os.path.join(run_dir, "history.json"), history)
    write_json(os.path.join(run_dir, "metrics.json"), metrics)


def machine_memory():
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_needed(cfg):
    """Bytes a run needs at its peak, roughly: per weight the value, its gradient buffer and
    the optimiser's state (Adam 2 arrays, SGD 1); the batch's inputs, activities and dL/dz
    of every layer (and a locally-connected layer's receptive fields); the images; the
    head's features of every training, validation and test digit."""
    sizes, rows, ff = cfg.layer_sizes, 2 * cfg.batch_size, core()
    kinds = cfg.layer_kinds()
    n_weights = sum(n_in * n_out if kind is None else int(np.prod(kind.weight_shape(n_out)))
                    for n_in, n_out, kind in zip(sizes[:-1], sizes[1:], kinds))
    fields = [0 if kind is None else kind.index.size for kind in kinds]
    per_weight = 2 + {"adam": 2, "sgd": 1}[cfg.optimizer]
    batch = 3 * rows * sum(sizes) + rows * sum(fields)
    images = 2 * (ff.N_TRAIN_MAX + ff.N_TEST) * sizes[0]
    features = ((cfg.n_train + cfg.val_size + ff.N_TEST) * sum(sizes[-cfg.top_k:])
                if cfg.softmax_epochs else 0)
    return 4 * (per_weight * n_weights + batch + images + features)


def holds_run(run_dir):
    return any(os.path.exists(os.path.join(run_dir, f)) for f in ("model.npz", "checkpoint.npz"))


def lock_run_folder(run_dir):
    """An exclusive lock on run_dir, held until the returned file is closed (or the process
    ends, however it ends): a second process on the same folder is refused at once. Also
    removes the temporary files a killed write left behind."""
    os.makedirs(run_dir, exist_ok=True)
    f = open(os.path.join(run_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        other = f.read().strip()
        f.close()
        raise SettingsError(f"{run_dir} is in use by another run (process "
                            f"{other or 'unknown'}); wait for it to end or give another --out")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    for name in os.listdir(run_dir):
        if name.startswith(".tmp-"):
            os.remove(os.path.join(run_dir, name))
    return f


def load_run(run_dir):
    """A saved run: .cfg, .weights, .biases, .head ((W, b) or None), .ff_history,
    .softmax_history, .metrics, .environment, .run_dir. A missing or damaged file raises
    DataError."""
    from types import SimpleNamespace
    paths = [os.path.join(run_dir, name) for name in RUN_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{missing[0]} not found: {run_dir} holds no finished run")
    try:
        with np.load(paths[0]) as z:
            cfg = run_config(json.loads(str(z["config"])))
            kinds = cfg.layer_kinds()
            weights = [stored(kind, z[f"W{l}"]) for l, kind in enumerate(kinds)]
            biases = [z[f"b{l}"] for l in range(len(kinds))]
            head = (z["softmax_W"], z["softmax_b"]) if "softmax_W" in z else None
    except READ_ERRORS as e:
        raise damaged_error(paths[0], e) from None
    documents = []
    for path in paths[1:]:
        try:
            with open(path) as f:
                documents.append(json.load(f))
        except (OSError, ValueError) as e:
            raise damaged_error(path, e) from None
    history, metrics = documents
    try:
        check_history(history, len(weights))
        run = SimpleNamespace(cfg=cfg, weights=weights, biases=biases, head=head,
                              ff_history=history["ff"], softmax_history=history["softmax"],
                              environment=history["environment"], metrics=metrics,
                              run_dir=run_dir)
    except (KeyError, TypeError, ValueError) as e:
        raise damaged_error(paths[1], e) from None
    try:
        bad = [k for k, v in metrics.items() if k.endswith("_error")
               and not (v is None or isinstance(v, (int, float)) and not isinstance(v, bool))]
        if not isinstance(metrics, dict) or bad:
            raise ValueError(f"{bad[0]} is {metrics[bad[0]]!r}, not a number" if bad
                             else "not a JSON object")
    except (AttributeError, ValueError) as e:
        raise damaged_error(paths[2], e) from None
    return run


def load_network(run_dir):
    """load_run's namespace for a finished run; for a run in progress (a folder holding only
    its checkpoint), the network after its finished epochs: .cfg, .weights, .biases,
    .ff_history from the checkpoint, no head, empty .metrics, .in_progress True."""
    from types import SimpleNamespace
    if (os.path.isfile(os.path.join(run_dir, RUN_FILES[0]))
            or not os.path.isfile(os.path.join(run_dir, "checkpoint.npz"))):
        run = load_run(run_dir)
        run.in_progress = False
        return run
    cfg, state = load_checkpoint(run_dir)
    return SimpleNamespace(cfg=cfg, weights=state.weights, biases=state.biases, head=None,
                           ff_history=state.history, softmax_history=None, environment=None,
                           metrics={}, run_dir=run_dir, in_progress=True)


def check_history(history, n_layers):
    """ValueError unless history.json's curves are what the figures read: per epoch one
    number (or null) per layer for the FF loss and accuracy, and equally long lists of
    numbers for the softmax head."""
    def numbers(values, what):
        if not isinstance(values, list) or not all(
                v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in values):
            raise ValueError(f"{what} is not a list of numbers")
    for key in ("loss", "accuracy"):
        rows = history["ff"][key]
        if not isinstance(rows, list):
            raise ValueError(f"ff.{key} is not a list")
        for row in rows:
            numbers(row, f"ff.{key}")
            if len(row) != n_layers:
                raise ValueError(f"ff.{key} has a row of {len(row)} values for {n_layers} layers")
    numbers(history["ff"]["seconds"], "ff.seconds")
    head = history["softmax"]
    if head is None:
        return
    if head.get("kind") == "lbfgs":  # the converged head: the curves of each fit
        fits = head.get("fits")
        if not isinstance(fits, list) or not all(isinstance(f, dict) for f in fits):
            raise ValueError("softmax.fits is not a list of fits")
        groups = [{f"softmax.fits[{i}].{key}": fit.get(key, [])
                   for key in ("loss", "train_error", "val_error")} for i, fit in enumerate(fits)]
    else:
        groups = [{f"softmax.{key}": values for key, values in head.items()}]
    for group in groups:
        for what, values in group.items():
            numbers(values, what)
        if len({len(values) for values in group.values() if values}) > 1:
            raise ValueError("softmax curves of different lengths")




# -----------------------------------------------------------------------------
# CLI: flags -> a checked configuration and run folder -> run_experiment() -> one line per error

def parse_option(config_class, name, text):
    """The value of config_class's field `name` written as `text` on the command line,
    checked by check_option; argparse turns the error into one line and exit status 2."""
    kind = config_class.__dataclass_fields__[name].type
    try:
        if kind is tuple:
            value = tuple(int(s) for s in text.split(","))
        else:
            value = kind(text)
    except ValueError:
        what = {tuple: "a comma-separated list of integers", int: "an integer",
                float: "a number"}.get(kind, "a value")
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    try:
        check_option(config_class, name, value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def number_arg(kind, low, above=False):
    """An argparse type for a script's own numeric flag: a finite `kind` >= low (> low with
    above)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if above else '>='} {low}")
        return value
    return parse


def layer_sizes_arg(text):
    return parse_option(core().FFConfig, "layer_sizes", text)


RETIRED_FLAGS = {"--negatives": "each script has its own negatives: hybrid images in "
                 "ff_hybrid_mnist.py and ff_local_mnist.py, the label in the image in "
                 "ff_label_mnist.py"}


class OtherScriptsFlag(argparse.Action):
    """A flag of another experiment script's configuration: refused in one line that names
    the script that has it."""

    def __init__(self, option_strings, dest, where, **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.where = where

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not a flag of {parser.prog}: "
                     f"{self.where}")


def build_parser(config_class=None, resume=True, description=None, parents=(), prog=None):
    """The command line of an experiment script, built from its configuration class's fields
    (FFConfig by default): every training flag defaults to None, so a flag that is not None
    was given; args.config_class is the class. A flag of another script is refused, naming
    that script. A figure script adds its own flags as parents (they come first) and leaves
    out --resume when it cannot continue a run."""
    config_class = config_class or core().FFConfig
    p = argparse.ArgumentParser(prog=prog, parents=list(parents),
                                description=description or config_class.__doc__.split("\n\n")[0])
    p.set_defaults(config_class=config_class)
    training = p.add_argument_group("training (the run's configuration)")
    own = set(config_class.__dataclass_fields__)
    others = {}  # flag -> the scripts that have it
    for script in SCRIPTS:
        for name in config_class_fields(script):
            if name not in own:
                others.setdefault(flag(name), []).append(script)
    for name, scripts in sorted(others.items()):
        p.add_argument(name, action=OtherScriptsFlag,
                       where=f"it belongs to {' and '.join(scripts)}")
    for name, where in RETIRED_FLAGS.items():
        p.add_argument(name, action=OtherScriptsFlag, where=where)
    for f in dataclasses.fields(config_class):
        meta = f.metadata
        default = meta["default_text"] or shown(f.default)
        help_text = f"{meta['help']} (default: {default})"
        if f.type is bool:
            training.add_argument(flag(f.name), action="store_const", const=True,
                                  default=None, help=help_text)
        else:
            metavar = meta["metavar"] or ("{" + ",".join(meta["choices"]) + "}"
                                          if meta["choices"] else f.name.upper())
            training.add_argument(flag(f.name),
                                  type=functools.partial(parse_option, config_class, f.name),
                                  default=None, metavar=metavar, help=help_text)
    files = p.add_argument_group("data and run folder")
    files.add_argument("--data-dir", help="folder with the four MNIST files (default: "
                       "$MNIST_DIR, else the repository's data/mnist; nothing is downloaded)")
    files.add_argument("--out", help="run folder (default: runs/<timestamp>-<4 random hex "
                       "digits>)")
    files.add_argument("--checkpoint-every", type=number_arg(int, 1), default=1, metavar="K",
                       help="write the checkpoint after every K-th FF epoch and the last "
                            "(default: 1; on a GPU writing it can cost as much as an epoch); "
                            "the time it took is metrics.json's checkpoint_seconds")
    if resume:
        files.add_argument("--resume", metavar="DIR",
                           help="continue the run in DIR, to its own --n-epochs unless "
                                "--n-epochs is given; every other setting is the run's own")
    files.add_argument("--dry-run", action="store_true",
                       help="check every flag and output path, print the configuration and "
                            "exit without loading data or training")
    return p


@functools.lru_cache(maxsize=None)
def config_class_fields(script):
    return tuple(config_class(script).__dataclass_fields__)


def script_for(argv):
    """(script, argv) for a command line written for the one trainer that held every
    experiment before the scripts were split (the committed sweep lists): --negatives label
    runs ff_label_mnist.py, a --local with layers ff_local_mnist.py, the rest
    ff_hybrid_mnist.py. As argparse did, the last --negatives and --local count; every
    --negatives and an empty --local (dense layers) are left out. A line may instead name
    its script, `--script ff_recurrent_mnist.py`, and then holds that script's own flags.
    ValueError for an unknown --script, for a
    --negatives other than hybrid or label, or label negatives with locally-connected layers."""
    def take(name):
        """The last value of flag `name` (None if absent), removed from the rest."""
        value, rest, i = None, [], 0
        while i < len(argv):
            if argv[i].startswith(name + "="):
                value = argv[i].split("=", 1)[1]
            elif argv[i] == name and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                rest.append(argv[i])
            i += 1
        return value, rest
    argv = list(argv)
    script, rest = take("--script")
    if script is not None:  # a line that names its script runs it with the other flags
        if script not in SCRIPTS:
            raise ValueError(f"--script {script} is not one of {', '.join(SCRIPTS)}")
        return script, rest
    negatives, argv = take("--negatives")
    if negatives not in (None, "hybrid", "label"):
        raise ValueError(f"--negatives {negatives} is not one of hybrid, label")
    local, without_local = take("--local")
    if local == "":
        argv = without_local
    if negatives == "label" and local:
        raise ValueError("--negatives label with --local: no script runs both")
    return ("ff_label_mnist.py" if negatives == "label" else "ff_local_mnist.py" if local
            else "ff_hybrid_mnist.py"), argv


def flags_given(args):
    """The configuration fields whose flags were written on the command line."""
    return {name for name in args.config_class.__dataclass_fields__
            if getattr(args, name, None) is not None}


def check_used(cfg, given):
    """SettingsError naming the first given flag that cfg's run would store and ignore."""
    unused = cfg.unused_fields()
    for name in sorted(given & set(unused)):
        raise SettingsError(f"{flag(name)} is given but unused: it needs {unused[name]}")


def check_writable(path, flag_name, folder=True):
    """Refuse, before anything is loaded or trained, an output path that cannot be written:
    a file where a folder goes (or the reverse), a path below a file, a read-only folder."""
    path = os.path.abspath(path)
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise SettingsError(f"{flag_name} {path} is a file, not a folder")
    if not folder and os.path.isdir(path):
        raise SettingsError(f"{flag_name} {path} is a folder; give the path of a file")
    existing = path if folder else os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SettingsError(f"{flag_name} {path} lies below {existing}, which is a file")
    try:  # a real write: permissions alone miss read-only file systems (and root)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SettingsError(f"{flag_name} {path}: cannot write in {existing} ({e.strerror or e})")


RESUME_MAY_CHANGE = ("n_epochs", "device")  # a GPU run can continue on the CPU and back


def prepare_run(args, parser, default_out=None):
    """Adds args.config (a checked configuration of args.config_class) and args.run_dir,
    before anything is loaded.

    A new run: the given flags over the class's defaults; the folder is --out, else
    default_out(args) (a figure script's), else runs/<timestamp>-<random>, which never
    collides. --resume: the configuration is the run's own; a flag that contradicts it is
    refused, except those in RESUME_MAY_CHANGE and --data-dir. --device gpu without a usable
    GPU raises SettingsError. A bad value exits 2 through parser.error; an unusable path or
    a contradiction raises SettingsError."""
    given = flags_given(args)
    if getattr(args, "resume", None):
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            parser.error("--resume writes into its own folder; leave out --out")
        stored, done = read_checkpoint_config(args.resume)
        if type(stored) is not args.config_class:
            raise SettingsError(f"the run in {args.resume} was made by {stored.SCRIPT}; "
                                f"resume it with {stored.SCRIPT}")
        for name in sorted(given - set(RESUME_MAY_CHANGE)):
            if getattr(args, name) != getattr(stored, name):
                raise SettingsError(
                    f"{flag(name)} {shown(getattr(args, name))} contradicts the run in "
                    f"{args.resume}, which has {shown(getattr(stored, name))}; --resume keeps "
                    "the run's own settings (only --n-epochs, --device and --data-dir may be "
                    "given)")
        try:
            cfg = dataclasses.replace(stored, **{name: getattr(args, name)
                                                 for name in given & set(RESUME_MAY_CHANGE)})
        except ValueError as e:
            parser.error(str(e))
        total_epochs = core().total_epochs
        if total_epochs(cfg) < done:
            per_epoch = total_epochs(dataclasses.replace(cfg, n_epochs=1))
            raise SettingsError(
                f"--n-epochs {cfg.n_epochs} is fewer than the {done} FF epochs the run in "
                f"{args.resume} has done; give at least {-(-done // per_epoch)}, or leave "
                f"--n-epochs out to continue to the run's own {stored.n_epochs}")
        run_dir = args.resume
        check_writable(run_dir, "--resume")
        if total_epochs(cfg) == done and os.path.exists(os.path.join(run_dir, "metrics.json")):
            args.finished = (f"{run_dir} is finished after {done} FF epochs; nothing to do "
                             "(a larger --n-epochs extends it)")
    else:
        try:
            cfg = args.config_class(**{name: getattr(args, name) for name in given})
        except ValueError as e:
            parser.error(str(e))
        check_used(cfg, given)
        run_dir = args.out or (default_out(args) if default_out else None)
        if run_dir is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = os.path.join("runs", f"{stamp}-{os.urandom(2).hex()}")
        check_writable(run_dir, "--out")
        if (args.out or default_out) and holds_run(run_dir):
            raise SettingsError(f"{run_dir} already holds a run; "
                                + (f"use --resume {run_dir} or another --out"
                                   if hasattr(args, "resume") else "give another --out"))
    needed, have = memory_needed(cfg), machine_memory()
    if have and needed > have:
        raise SettingsError(f"the run needs about {needed / 2 ** 30:.0f} GiB for weights, "
                            f"optimiser state and buffers; this machine has "
                            f"{have / 2 ** 30:.0f} GiB")
    problem = cfg.device == "gpu" and gpu_problem()
    if problem:
        resumed = getattr(args, "resume", None) and "device" not in given
        raise SettingsError(problem + ("; --device cpu continues the run on the CPU"
                                       if resumed else ""))
    args.config, args.run_dir = cfg, run_dir
    return args


def parse_args(argv=None, parser=None):
    """Parsed and prepared training flags (see prepare_run)."""
    parser = parser or build_parser()
    return prepare_run(parser.parse_args(argv), parser)


def print_dry_run(args, **outputs):
    """What a run would use, one JSON value per line, for --dry-run."""
    for key, value in {"config": config_record(args.config), "run_dir": args.run_dir,
                       "resume": getattr(args, "resume", None), "data_dir": args.data_dir,
                       "memory_gib": round(memory_needed(args.config) / 2 ** 30, 2),
                       "checkpoint_every": getattr(args, "checkpoint_every", 1), **outputs}.items():
        print(f"{key}: {json.dumps(value)}")


@dataclass
class RunResult:
    """What run_experiment() did: the metrics (also in metrics.json), the configuration,
    the folder."""
    metrics: dict
    config: object
    run_dir: str



def run_experiment(args, log=print, callback=None):
    """The whole experiment for prepared CLI args (see prepare_run): FF training with a
    checkpoint after every epoch, the read-outs, the run files. callback(epoch, state) runs
    after each FF epoch, once its checkpoint is saved."""
    cfg, run_dir, ff = args.config, args.run_dir, core()
    total_epochs = ff.total_epochs
    saved, done = [0], [0]  # epochs in the last checkpoint written; epochs finished
    every, checkpoint_seconds = getattr(args, "checkpoint_every", 1), [0.0]

    def recovery():
        finished = done[0]
        if saved[0] == 0 and finished:
            return (f"{finished} epoch{'s' * (finished != 1)} finished but none was "
                    f"checkpointed yet (--checkpoint-every {every}), so there is nothing to "
                    "resume")
        if saved[0] < finished:
            return (f"{finished} epochs finished; the checkpoint after epoch {saved[0]} is "
                    f"kept (--checkpoint-every {every}): --resume {run_dir} continues from it")
        if saved[0] == 0:
            return "no epoch finished, so there is nothing to resume"
        return (f"the checkpoint after epoch {saved[0]} is kept: --resume {run_dir} "
                "continues from it")

    def after_epoch(epoch, state):
        # an epoch counts as finished for the messages once its checkpoint, if due, is
        # written: a signal during that write leaves the one before it, and says so
        if (epoch + 1) % every == 0 or epoch + 1 == total_epochs(cfg):
            t = time.perf_counter()
            try:
                save_checkpoint(run_dir, cfg, state)
            except OSError as e:
                raise DataError(f"could not write the checkpoint of epoch {epoch + 1} in "
                                f"{run_dir} ({e.strerror or e}); {recovery()}") from None
            checkpoint_seconds[0] += time.perf_counter() - t
            saved[0] = epoch + 1
        done[0] = epoch + 1
        if callback is not None:
            callback(epoch, state)

    lock = lock_run_folder(run_dir)
    try:
        resume = getattr(args, "resume", None)
        if not resume and holds_run(run_dir):  # another process may have started it meanwhile
            raise SettingsError(f"{run_dir} already holds a run; use another --out")
        if resume:
            state = load_checkpoint(run_dir)[1]
            saved[0] = done[0] = state.epochs_done
            log(f"resuming {run_dir} after epoch {state.epochs_done}")
            metrics_path = os.path.join(run_dir, "metrics.json")
            if os.path.exists(metrics_path):  # extended: unfinished until it finishes again
                os.remove(metrics_path)
                log(f"the run is extended to {total_epochs(cfg)} epochs: its metrics.json of "
                    f"{state.epochs_done} epochs is removed until the run finishes")
        else:
            state = ff.FFState.fresh(cfg, np.random.default_rng(cfg.seed))
        # read now: a long run's files name the code it ran, not what the checkout holds later
        env = environment(cfg.device)
        x_train, y_train, x_test, y_test = ff.load_mnist(args.data_dir)
        x_train, y_train, x_val, y_val = ff.split_validation(x_train, y_train, cfg.val_size,
                                                             cfg.n_train)
        write_json(os.path.join(run_dir, "args.json"), config_record(cfg))
        log(f"run folder {run_dir}; {len(x_train)} training digits; layers "
            f"{'-'.join(map(str, cfg.layer_sizes))}; {total_epochs(cfg)} FF epochs")

        t0 = time.perf_counter()
        ff.train_ff(x_train, cfg, state, callback=after_epoch, log=log, y_train=y_train)
        ff_seconds = sum(state.history["seconds"])
        head, softmax_history, metrics = None, None, {}
        splits = [s for s in (("val", x_val, y_val), ("test", x_test, y_test)) if len(s[1])]
        metrics.update(cfg.read_outs(state, splits, log))
        if cfg.softmax_epochs > 0:
            head, softmax_history, head_metrics = ff.fit_head(
                state.weights, state.biases, cfg, (x_train, y_train), splits, log)
            metrics.update(head_metrics)
        last = lambda key: state.history[key][-1] if state.history[key] else None
        metrics.update(ff_loss=last("loss"), ff_seconds=ff_seconds, ff_epochs=state.epochs_done,
                       checkpoint_seconds=checkpoint_seconds[0],
                       total_seconds=time.perf_counter() - t0, peak_rss_mib=peak_rss_mib(),
                       run_dir=run_dir)
        metrics[cfg.ACCURACY_KEY] = last("accuracy")
        try:
            save_run(run_dir, cfg, state, head, softmax_history, metrics, env)
        except OSError as e:
            raise DataError(f"could not save the run in {run_dir} ({e.strerror or e}); "
                            f"{recovery()}, fits the head again and saves the run") from None
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        raise RunInterrupted(f"{'terminated' if terminated else 'interrupted'}; {recovery()}",
                             143 if terminated else 130) from None
    finally:
        lock.close()
    log(final_line(metrics, ff_seconds, run_dir))
    return RunResult(metrics, cfg, run_dir)


def final_line(metrics, ff_seconds, run_dir):
    """The run's last line: the goodness read-out first for a label run (the paper's
    metric), then the softmax head's errors."""
    parts = []
    for key, what in (("goodness_{}_error", "goodness read-out"),
                      ("hard_head_{}_error", "hard-negative head"), ("{}_error", "softmax head")):
        errors = [f"{split} error {100 * metrics[key.format(split)]:.2f}%"
                  for split in ("val", "test", "train") if key.format(split) in metrics]
        if errors:
            parts.append(f"{what}: " + "  ".join(errors))
    return "; ".join(parts + [f"FF {ff_seconds:.0f} s -> {run_dir}"])


def exit_status(body):
    """body() -> exit status; the errors a user can act on become one line on stderr.
    SIGTERM is handled like Ctrl-C until body returns; then the caller's handler is back (a
    test or a notebook that calls main() keeps its own)."""
    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave the signal alone
        previous = None
    try:
        return handled(body)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def handled(body):
    """body() -> exit status, the errors a user can act on as one line on stderr."""
    try:
        return body()
    except SettingsError as e:
        error, status = e, 2
    except RunInterrupted as e:
        error, status = e, e.status
    except KeyboardInterrupt as e:  # outside training (loading, drawing): nothing to continue
        terminated = isinstance(e, Terminated)
        error, status = ("terminated" if terminated else "interrupted"), 143 if terminated else 130
    except (DataError, TrainingDiverged, OSError) as e:
        error, status = e, 1
    print(f"error: {error}", file=sys.stderr)
    return status


def main(config_class, argv=None):
    """An experiment script's command line: train, resume, or --dry-run; the exit status."""
    def body():
        args = parse_args(argv, build_parser(config_class, prog=config_class.SCRIPT))
        if getattr(args, "finished", None):
            print(args.finished)
        elif args.dry_run:
            print_dry_run(args)
        else:
            run_experiment(args)
        return 0
    return exit_status(body)
