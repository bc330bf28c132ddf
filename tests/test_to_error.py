"""The cost to a validation error (docs/data-movement.md, section 3): FF's curve is evaluated
every few steps after the step is made, each algorithm runs at its fastest learning rate,
and the cost is the median steps times the traced step of its best schedule, FF's head
added once; records of another experiment are refused before anything is computed."""
import json

import numpy as np
import pytest

import ff_hybrid_mnist as ff
from conftest import one_line
from experiments.data_movement import data_movement as dm

SETTINGS = dict(dm.CURVE_SETTINGS, n_train=40, val_size=30, batch_size=20, ff_epochs=2,
                ff_softmax_epochs=1, bp_epochs=1, every=1)


def random_data(seed=0):
    rng = np.random.default_rng(seed)
    x = [rng.random((n, 784), dtype=np.float32) for n in (40, 30, 30)]
    y = [rng.integers(0, 10, n) for n in (40, 30, 30)]
    return x[0], y[0], x[1], y[1], x[2], y[2]


def test_ff_curve_evaluates_the_network_after_every_few_steps(monkeypatch):
    """Step 0 is the untrained network, then one evaluation after each `every` steps, each
    of the network those steps made: the last is the network train_ff ends with."""
    seen = []
    extract = ff.extract_features
    monkeypatch.setattr(ff, "extract_features", lambda weights, *a, **k: (
        seen.append(weights[0].copy()), extract(weights, *a, **k))[1])
    points = dm.ff_curve(8, 0, 0.03, random_data(), SETTINGS)
    assert [p["steps"] for p in points] == [0, 1, 2, 3, 4]
    evaluated = seen[::3]  # fit, validation and test features at each evaluation
    cfg = ff.FFConfig(layer_sizes=(784, 8, 8), n_epochs=2, batch_size=20, lr=0.03,
                      threshold=8.0, top_k=2, n_train=40, val_size=30, seed=0)
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    assert np.array_equal(evaluated[0], state.weights[0])
    ff.train_ff(random_data()[0], cfg, state, log=dm.quiet)
    assert np.array_equal(evaluated[-1], state.weights[0])
    assert not np.array_equal(evaluated[-2], state.weights[0])
    assert len(dm.ff_curve(8, 0, 0.03, random_data(), dict(SETTINGS, every=2))) == 3


def run(alg, lr, seed, steps_to_target, width=2):
    """A curve whose validation error is 0.5 until steps_to_target (None: never), then 0.05."""
    points = [{"steps": k, "val_error": 0.05 if steps_to_target is not None
               and k >= steps_to_target else 0.5, "test_error": 0.06 + seed / 100}
              for k in range(0, 101, 10)]
    return {"algorithm": alg, "width": width, "lr": lr, "seed": seed, "points": points}


def test_tuned_takes_the_rate_whose_seeds_all_get_there_in_the_fewest_median_steps():
    runs = ([run("ff", 0.1, s, k) for s, k in enumerate((10, None, 10))]   # a seed never does
            + [run("ff", 0.03, s, k) for s, k in enumerate((30, 20, 90))]  # median 30
            + [run("ff", 0.01, s, k) for s, k in enumerate((40, 40, 40))])
    best, table = dm.tuned(runs, 0.1)
    assert best == {"lr": 0.03, "steps": [30, 20, 90], "median_steps": 30.0,
                    "median_test_error": pytest.approx(0.07)}
    assert table == {"0.01": [40, 40, 40], "0.03": [30, 20, 90], "0.1": [10, None, 10]}
    assert dm.tuned(runs, 0.01) == (None, {"0.01": [None] * 3, "0.03": [None] * 3,
                                           "0.1": [None] * 3})


def schedule_record(width=2, batch=20, rules="original"):
    def cost(ff_c, bp_c):
        return {"ff": {"cost": ff_c, "by_phase": {"l2norm": 1.0}},
                "backprop": {"cost": bp_c, "by_phase": {}}, "ratio": ff_c / bp_c,
                "shares": dict.fromkeys(("ff_l2", "ff_update", "backprop_backward",
                                         "backprop_update"), 0.1)}
    return {"width": width, "batch": batch, "rules_name": rules,
            "schedules": {"numpy": cost(500.0, 200.0), "tiled": cost(150.0, 80.0),
                          "best": cost(150.0, 60.0)},
            "best": {"ff": "tiled", "backprop": "best", "ratio": 2.5}}


@pytest.fixture
def inputs(tmp_path):
    curves = {"settings": dict(SETTINGS), "runs": [
        run("ff", lr, s, k) for lr, ks in ((0.1, (20, 30, 40)), (0.03, (60, 60, 60)))
        for s, k in enumerate(ks)] + [
        run("backprop", lr, s, k) for lr, ks in ((0.001, (10, 10, 20)), (0.003, (20, 20, 20)))
        for s, k in enumerate(ks)]}
    (tmp_path / "c.json").write_text(json.dumps(curves))
    (tmp_path / "s.jsonl").write_text(json.dumps(schedule_record()) + "\n"
                                      + json.dumps(schedule_record(3, rules="fused-float32")))
    return tmp_path, curves


def to_error(tmp_path, *extra):
    return dm.main(["to-error", "--curves", str(tmp_path / "c.json"), *extra, "--schedules",
                    str(tmp_path / "s.jsonl"), "--targets", "0.1", "--out",
                    str(tmp_path / "e.json")])


def test_to_error_prices_the_median_steps_at_each_algorithms_best_schedule(inputs, capsys,
                                                                          monkeypatch):
    tmp_path, _ = inputs
    monkeypatch.setattr(dm, "HEAD_BATCH", 8)  # a smaller trace of the head's step
    assert to_error(tmp_path) == 0
    record = json.load(open(tmp_path / "e.json"))
    (row,) = record["rows"]
    assert (row["ff"]["lr"], row["ff"]["median_steps"]) == (0.1, 30.0)
    assert (row["backprop"]["lr"], row["backprop"]["median_steps"]) == (0.001, 10.0)
    heads = record["heads"]["2"]
    rules = dm.RULES["original"]
    tiled = dm.head_cost(2, SETTINGS, rules, dm.SCHEDULES["tiled"])
    assert heads["best"] == tiled and heads["best"]["chunks"] == 2
    assert heads["best"]["head_steps"] == 5  # one epoch of 40 digits at batch 8
    best, numpy_order = row["best"], row["numpy"]
    assert best["ff_cost"] == 30 * 150.0 + tiled["cost"]
    assert best["backprop_cost"] == 10 * 60.0
    assert best["ratio"] == best["ff_cost"] / best["backprop_cost"]
    assert numpy_order["ff_cost"] == 30 * 500.0 + heads["numpy"]["cost"]
    assert numpy_order["backprop_cost"] == 10 * 200.0
    assert row["steps_ratio"] == 3.0
    capsys.readouterr()
    assert dm.main(["to-error-table", "--record", str(tmp_path / "e.json")]) == 0
    assert "| 784-2-2 | 10.0% | 0.1: 20, 30, 40 | 0.001: 10, 10, 20 | 3.0 |" in \
        capsys.readouterr().out


@pytest.mark.parametrize("change, says", [
    (lambda c: c["settings"].pop("every"), "evaluates FF once an epoch"),
    (lambda c: c["runs"].pop(), "not every algorithm, width and rate was run at the same seeds"),
    (lambda c: [r.update(width=4) for r in c["runs"]], "has no step of 784-4-4 at batch 20"),
    (lambda c: c["runs"].append(dict(c["runs"][0])), "both hold the ff run of 784-2-2, lr 0.1"),
    (lambda c: c["runs"].extend(dict(r, width=3) for r in list(c["runs"])),
     "priced the widths under different rules"),
])
def test_to_error_refuses_curves_it_cannot_price(inputs, capsys, monkeypatch, change, says):
    tmp_path, curves = inputs
    monkeypatch.setattr(dm, "run_to_error", lambda args: pytest.fail("computed"))
    change(curves)
    (tmp_path / "c.json").write_text(json.dumps(curves))
    assert to_error(tmp_path) == 1
    assert says in one_line(capsys.readouterr().err)
