"""MNIST loader on small IDX files written here; the embedded copy; nothing downloaded."""
import gzip
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import ff_hybrid_mnist as ff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_dataset(seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (6, 28, 28)), "train_labels": rng.integers(0, 10, 6),
              "test_images": rng.integers(0, 256, (3, 28, 28)), "test_labels": rng.integers(0, 10, 3)}
    raw = {role: idx_bytes(a, 0x803 if role.endswith("images") else 0x801) for role, a in arrays.items()}
    files = {role: (f"tiny-{role}", hashlib.sha256(data).hexdigest()) for role, data in raw.items()}
    return arrays, raw, files


def write(folder, files, raw, compress=True, damage=None):
    os.makedirs(folder, exist_ok=True)
    for role, (name, _) in files.items():
        data = raw[role] if damage is None or role != damage[0] else damage[1](raw[role])
        path = os.path.join(folder, name + (".gz" if compress else ""))
        with open(path, "wb") as f:
            f.write(gzip.compress(data) if compress else data)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MNIST_DIR", raising=False)
    return tmp_path


def load(folder, files, **kw):
    kw.setdefault("embedded_dir", None)
    return ff.load_mnist(folder, files=files, **kw)


@pytest.mark.parametrize("compress", [True, False])
def test_good_files_load(clean_env, compress):
    arrays, raw, files = tiny_dataset()
    write(clean_env / "d", files, raw, compress)
    x_train, y_train, x_test, y_test = load(str(clean_env / "d"), files)
    assert x_train.dtype == np.float32 and x_train.shape == (6, 784)
    np.testing.assert_allclose(x_train * 255, arrays["train_images"].reshape(6, 784), atol=1e-4)
    np.testing.assert_array_equal(y_test, arrays["test_labels"])
    assert 0 <= x_test.min() and x_test.max() <= 1


DAMAGES = {
    "corrupt gz": ("gz", lambda p: p.write_bytes(b"\x1f\x8b\x08\x00" + b"\x13" * 200), "decompress"),
    "not gzip": ("gz", lambda p: p.write_bytes(b"plain text, no archive"), "not a gzip"),
    "truncated gz": ("gz", lambda p: p.write_bytes(p.read_bytes()[:-30]), "decompress"),
    "truncated data": ("raw", lambda d: d[:-100], "truncated"),
    "wrong magic": ("raw", lambda d: (0x804).to_bytes(4, "big") + d[4:], "magic"),
    "wrong size": ("raw", lambda d: d[:8] + (27).to_bytes(4, "big") + d[12:], "28x28"),
    "count mismatch": ("raw", lambda d: d[:4] + (5).to_bytes(4, "big") + d[8:], "header says 5"),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_damaged_file_gives_one_clear_error(clean_env, case):
    kind, damage, words = DAMAGES[case]
    arrays, raw, files = tiny_dataset()
    folder = clean_env / "d"
    if kind == "raw":
        raw = dict(raw, train_images=damage(raw["train_images"]))
        files = dict(files, train_images=(files["train_images"][0],
                                          hashlib.sha256(raw["train_images"]).hexdigest()))
        write(folder, files, raw)
    else:
        write(folder, files, raw)
        damage(folder / (files["train_images"][0] + ".gz"))
    with pytest.raises(ff.DataError) as e:
        load(str(folder), files)
    msg = str(e.value)
    assert "\n" not in msg and files["train_images"][0] in msg and words in msg


def test_sum_mismatch_and_label_count(clean_env):
    arrays, raw, files = tiny_dataset()
    write(clean_env / "d", files, raw)
    bad = dict(files, test_labels=(files["test_labels"][0], "0" * 64))
    with pytest.raises(ff.DataError, match="SHA-256"):
        load(str(clean_env / "d"), bad)
    raw2 = dict(raw, test_labels=idx_bytes(arrays["test_labels"][:2], 0x801))
    files2 = dict(files, test_labels=(files["test_labels"][0], hashlib.sha256(raw2["test_labels"]).hexdigest()))
    write(clean_env / "e", files2, raw2)
    with pytest.raises(ff.DataError, match="3 images but 2 labels"):
        load(str(clean_env / "e"), files2)


def test_explicit_folder_must_hold_the_files(clean_env, monkeypatch):
    _, raw, files = tiny_dataset()
    with pytest.raises(ff.DataError, match="--data-dir"):
        load(str(clean_env / "empty"), files)
    monkeypatch.setenv("MNIST_DIR", str(clean_env / "empty"))
    with pytest.raises(ff.DataError, match="MNIST_DIR"):
        load(None, files)
    write(clean_env / "env", files, raw)
    monkeypatch.setenv("MNIST_DIR", str(clean_env / "env"))
    assert load(None, files)[0].shape == (6, 784)


def test_no_data_says_how_to_supply_it(clean_env):
    _, _, files = tiny_dataset()
    for embedded in (None, str(clean_env / "no-copy")):
        with pytest.raises(ff.DataError) as e:
            load(None, files, embedded_dir=embedded)
        assert "--data-dir" in str(e.value) and "MNIST_DIR" in str(e.value)


def test_damaged_embedded_copy_is_refused(clean_env):
    _, raw, files = tiny_dataset()
    embedded = clean_env / "embedded"
    write(embedded, files, raw, damage=("train_labels", lambda d: d[:-1] + b"\x09"))
    with pytest.raises(ff.DataError, match="SHA-256.*good copy"):
        load(None, files, embedded_dir=str(embedded))
    assert (embedded / (files["train_labels"][0] + ".gz")).exists()  # never deletes the user's data


def test_embedded_copy_found_from_another_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MNIST_DIR"}
    env.update(PYTHONPATH=ROOT)
    code = ("import ff_hybrid_mnist as ff;"
            "x, y, xt, yt = ff.load_mnist(); print(x.shape, xt.shape, y[:5].tolist())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(60000, 784) (10000, 784) [5, 0, 4, 1, 9]" in out.stdout


def test_cli_data_error_is_one_line_exit_1(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "ff_hybrid_mnist.py"),
                          "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("how", ["--data-dir", "MNIST_DIR"])
def test_damaged_file_in_a_named_folder_is_refused_and_kept(clean_env, monkeypatch, how):
    _, raw, files = tiny_dataset()
    folder = clean_env / "named"
    write(folder, files, raw, damage=("test_images", lambda d: d[:-1] + b"\x00"))
    if how == "MNIST_DIR":
        monkeypatch.setenv("MNIST_DIR", str(folder))
    with pytest.raises(ff.DataError, match="good copy"):
        load(str(folder) if how == "--data-dir" else None, files)
    assert (folder / (files["test_images"][0] + ".gz")).exists()  # the user's data: never deleted
