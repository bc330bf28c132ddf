"""The schedules of experiments/data_movement/schedules.py: a tiled product and a fused Adam
compute what the plain ones compute (every output depends on exactly the inputs it should),
in the order they claim, and move less data where they should."""
import json

import numpy as np
import pytest

from experiments.data_movement import bytedmd
from experiments.data_movement import data_movement as dm
from experiments.data_movement import schedules


def depends_on(trace):
    """{value id: frozenset of the argument ids it is computed from} over the whole trace."""
    args = {int(i) for a in trace.arguments for i in np.ravel(a)}
    leaves = {i: frozenset([i]) for i in args}
    for first_op, n_reads, reads, n, _, first_out in trace.chunks:
        counts = np.broadcast_to(n_reads, (n,)) if np.ndim(n_reads) else np.full(n, n_reads)
        at = 0
        for k in range(n):
            c = int(counts[k])
            leaves[first_out + k] = frozenset().union(*(leaves[int(r)] for r in reads[at:at + c]))
            at += c
    return leaves


@pytest.mark.parametrize("m, n, p, T", [(5, 7, 6, 3), (4, 4, 4, 2), (3, 8, 2, 16)])
def test_tiled_product_sums_the_same_terms_as_the_plain_one(m, n, p, T):
    t = bytedmd.Trace()
    A, B = t.argument((m, n)), t.argument((n, p))
    C = schedules.tiled_matmul(t, "mm", A, B, T)
    leaves = depends_on(t)
    for i in range(m):
        for j in range(p):
            assert leaves[int(C[i, j])] == frozenset(map(int, [*A[i], *B[:, j]])), (i, j)
    plain = bytedmd.Trace()
    plain.matmul("mm", plain.argument((m, n)), plain.argument((n, p)))
    assert (t.n_ops, t.n_reads) == (plain.n_ops, plain.n_reads)  # the same multiplies and adds


def test_tiled_product_moves_less_than_the_ijk_loop():
    costs = {}
    for tile in (0, 8):
        t = bytedmd.Trace()
        A, B = t.argument((32, 32)), t.argument((32, 32))
        t.returns(schedules.Schedule("s", tile=tile).matmul(t, "mm", A, B))
        costs[tile] = bytedmd.price(t)[0]
    assert costs[8] < 0.7 * costs[0]


def test_fused_adam_reads_each_input_once_per_element_and_moves_less():
    n = 2000
    t = bytedmd.Trace()
    p, g, m, v = (t.argument((n,)) for _ in range(4))
    p1, m1, v1 = schedules.fused_adam(t, p, g, m, v)
    leaves = depends_on(t)
    for e in (0, 1, n - 1):
        assert leaves[int(m1[e])] == {int(g[e]), int(m[e])}
        assert leaves[int(v1[e])] == {int(g[e]), int(v[e])}
        assert leaves[int(p1[e])] == {int(p[e]), int(g[e]), int(m[e]), int(v[e])}
    assert t.n_ops == 3 * n and t.n_reads == 7 * n
    t.returns(p1, m1, v1)
    passes = bytedmd.Trace()
    args = [passes.argument((n,)) for _ in range(4)]
    passes.returns(dm.adam(passes, *args))
    assert bytedmd.price(t)[0] < 0.6 * bytedmd.price(passes)[0]


def test_each_schedule_prices_both_steps_and_the_numpy_one_is_the_default():
    """A small step of each algorithm under each schedule: the numpy schedule is the order
    the step builders had before schedules (the same op list), and the best schedule moves
    less than numpy's for both."""
    rules = bytedmd.ORIGINAL_RULES
    default = dm.trace_ff_step(49, (8, 8), 2, rules=rules)
    numpy = dm.trace_ff_step(49, (8, 8), 2, rules=rules, schedule=schedules.NUMPY)
    assert bytedmd.price(default)[0] == bytedmd.price(numpy)[0]
    for trace in (dm.trace_ff_step, dm.trace_backprop_step):
        costs = {name: bytedmd.price(trace(49, (16, 16), 2, rules=rules, schedule=s))[0]
                 for name, s in schedules.SCHEDULES.items()}
        assert costs["best"] <= costs["tiled"] < costs["fused-adam"] < costs["numpy"], (
            trace.__name__, costs)
    ff = dm.trace_ff_step(49, (8, 8), 2, rules=rules, schedule=schedules.SCHEDULES["tiled"])
    best = dm.trace_ff_step(49, (8, 8), 2, rules=rules, schedule=schedules.SCHEDULES["best"])
    assert bytedmd.price(ff)[0] == bytedmd.price(best)[0]  # FF updates each layer as made


def test_backprop_updates_as_made_read_the_weights_before_their_update():
    """With updates as made, layer l's dL/dh below still comes from W_l as it was: every
    new weight depends on the same inputs as in numpy's order."""
    rules = bytedmd.ORIGINAL_RULES
    traces = {name: dm.trace_backprop_step(49, (6,), 2, warmup=0, rules=rules,
                                           schedule=schedules.SCHEDULES[name])
              for name in ("tiled", "best")}
    deps = {name: depends_on(t) for name, t in traces.items()}
    new = {name: [int(i) for i in np.concatenate([np.ravel(a) for a in t.returned_ids])]
           for name, t in traces.items()}
    assert [deps["tiled"][i] for i in new["tiled"]] == [deps["best"][i] for i in new["best"]]
    assert bytedmd.price(traces["best"])[0] < bytedmd.price(traces["tiled"])[0]


def test_schedules_command_records_each_schedule_and_the_table_reads_them(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert dm.main(["schedules", "--widths", "2", "--batches", "1", "--schedules", "numpy",
                    "best", "--out", str(out)]) == 0
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["rules"] == bytedmd.ORIGINAL_RULES and set(record["schedules"]) == {"numpy",
                                                                                       "best"}
    best = record["best"]
    assert best["ratio"] == (record["schedules"][best["ff"]]["ff"]["cost"]
                             / record["schedules"][best["backprop"]]["backprop"]["cost"])
    capsys.readouterr()
    assert dm.main(["schedules-table", "--records", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| 784-2-2 | 1 | original | numpy |" in table and "each at its best" in table
    out.write_text(out.read_text()[:200] + "\n")
    assert dm.main(["schedules-table", "--records", str(out)]) == 1
    assert f"{out}:1: not a JSON record" in capsys.readouterr().err
