"""The GIF of training: one frame per snapshot, the last held, its output path checked before
anything trains, and the script built on the module and the visualiser's figure helpers."""
import ast
import errno
import os

import imageio.v3 as iio
import numpy as np
import pytest

import ff_hybrid_mnist as ff
import make_ff_hybrid_mnist_gif as gif
import visualize_ff_hybrid_mnist as viz
from conftest import TINY, one_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gif_has_a_frame_per_snapshot_and_holds_the_last(tmp_path):
    path = tmp_path / "anim" / "training.gif"
    argv = TINY + ["--n-epochs", "3", "--snapshot-every", "2", "--hold-final", "3",
                   "--fps", "5", "--n-eval", "100", "--gif", str(path),
                   "--out", str(tmp_path / "anim" / "run")]
    assert gif.main(argv) == 0
    frames = iio.imread(path, index=None)
    # snapshots after epoch 2 (every 2) and epoch 3 (the last)
    assert frames.shape == (2, 480, 720, 3)
    assert frames[-1].std() > 5 and not np.array_equal(frames[0], frames[1])
    durations = [iio.immeta(path, index=i)["duration"] for i in range(len(frames))]
    assert durations == [200, 200 * (1 + 3)]  # 1/fps, then the final frame held 3 more
    assert iio.immeta(path)["loop"] == 0
    assert os.path.isfile(tmp_path / "anim" / "run" / "model.npz")  # run saved beside the GIF


def test_gif_path_is_checked_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ff, "load_mnist", lambda *a: pytest.fail("loaded data"))
    (tmp_path / "file").write_text("x")
    for path, words in ((tmp_path, "is a folder"), (tmp_path / "file" / "a.gif", "below")):
        assert gif.main(TINY + ["--gif", str(path), "--out", str(tmp_path / "run")]) == 2
        assert words in one_line(capsys.readouterr().err)


def test_gif_script_draws_with_the_visualisers_helpers_and_computes_nothing_itself():
    """The maths is the module's and the evaluation set, goodness, separation and histogram
    are the visualiser's helpers (one copy, so a frame and the figures agree): the GIF
    script imports them and defines none of them, nor calls the maths they wrap."""
    with open(os.path.join(ROOT, "make_ff_hybrid_mnist_gif.py")) as f:
        tree = ast.parse(f.read())
    names = {a.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for a in node.names} | {node.module for node in ast.walk(tree)
                                     if isinstance(node, ast.ImportFrom)}
    assert "ff_hybrid_mnist" in names and "visualize_ff_hybrid_mnist" in names
    helpers = {"evaluation_set", "layer_goodness", "separation", "goodness_bins",
               "draw_goodness_histogram"}
    assert helpers <= set(vars(viz))
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not defined & helpers
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "viz"}
    assert helpers <= used
    maths = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
             and isinstance(node.value, ast.Name) and node.value.id == "ff"}
    assert not maths & {"goodness", "network_activities", "make_hybrid_batch", "make_masks"}


def test_a_full_disk_while_writing_the_gif_names_the_file(tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(gif.iio, "imwrite", full_disk)
    path = tmp_path / "a.gif"
    assert gif.main(TINY + ["--n-epochs", "1", "--n-eval", "20", "--gif", str(path),
                            "--out", str(tmp_path / "run")]) == 1
    err = one_line(capsys.readouterr().err)
    assert f"could not write {path}" in err and "No space left" in err
    assert not path.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
