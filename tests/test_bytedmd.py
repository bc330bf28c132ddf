"""ByteDMD cost model: known cases, the original's (cybertronai/ByteDMD) linear-algebra table
under the default rules, closed forms worked out by hand, the named options that give the
earlier rules, and the fast pricing against a plain list-based replay of the definition on
random op lists."""
import itertools
import math

import numpy as np
import pytest

from experiments.data_movement import bytedmd as bd
from experiments.data_movement import data_movement as dm


def c(d):
    """The cost of one byte at depth d."""
    return math.ceil(math.sqrt(d))


def S(n):
    """The cost of the n topmost bytes, summed one by one."""
    return sum(c(d) for d in range(1, n + 1))


def plain_price(trace, returned=None):
    """The definition replayed on a Python list (top = end of the list): every read is
    priced against the stack before its operation, then the inputs move to the top in read
    order (or leave it, if never read again), then the output is pushed (if ever read).
    Returned values ("live", "read") never die; under "read" each is read once more at the
    end, against the final stack."""
    returned = returned or trace.returned
    sizes, initial, read_op, read_val, out_val, _, _ = trace.arrays()
    forever = trace.n_ops
    last = {}
    reads = {}
    for o, v in zip(read_op.tolist(), read_val.tolist()):
        last[v] = o
        reads.setdefault(o, []).append(v)
    kept = [] if returned == "dropped" else list(dict.fromkeys(trace.returned_values().tolist()))
    for v in kept:
        last[v] = forever

    def cost(v):
        above = sum(sizes[u] for u in stack[stack.index(v) + 1:])
        return S(above + sizes[v]) - S(above)

    stack = [v for v in initial.tolist() if v in last]
    total = 0
    for o in range(trace.n_ops):
        for v in reads.get(o, []):
            total += cost(v)
        for v in dict.fromkeys(reads.get(o, [])):
            stack.remove(v)
            if last[v] > o:
                stack.append(v)
        if last.get(int(out_val[o]), -1) > o:
            stack.append(int(out_val[o]))
    if returned == "read":
        total += sum(cost(v) for v in kept)
    return total


# the earlier rules of this tracer, at one byte a value
FUSED_DROPPED = dict(multiply_add="fused", returned="dropped")


@pytest.mark.parametrize("rules", [{}, FUSED_DROPPED, dict(returned="read")])
def test_known_cases(rules):
    # the original README's two cases; under "read" the returned sum, on top at the end,
    # is read once more (1)
    extra = 1 if rules.get("returned") == "read" else 0
    t = bd.Trace(**rules)
    a, b = bd.scalar_arguments(t, (2,), (2,))
    t.returns(sum(x * y for x, y in zip(a, b)))  # Python's sum starts from 0: 0 + a0 b0 is an op
    assert bd.price(t)[0] == 12 + extra
    t = bd.Trace(**rules)
    a, b, c_ = bd.scalar_arguments(t, (), (), ())
    t.returns((a + b) + c_)
    assert bd.price(t)[0] == 6 + extra
    assert bd.price(t)[2].tolist() == [c(1), c(2), c(1), c(2)] + [1] * extra


def test_the_originals_other_small_cases():
    # its test file: (a + b) + c at two bytes a value, the dot product written out, and
    # e > f for e = b + c, f = a + d (reads at depths 2, 3, then 2, 3, then 2, 1)
    t = bd.Trace(bytes_per_value=2)
    a, b, c_ = bd.scalar_arguments(t, (), (), ())
    t.returns((a + b) + c_)
    assert bd.price(t)[0] == 14 == 2 * S(4)   # each addition reads the 4 topmost bytes
    t = bd.Trace()
    a, b = bd.scalar_arguments(t, (2,), (2,))
    t.returns(a[0] * b[0] + a[1] * b[1])
    assert bd.price(t)[2].tolist() == [c(d) for d in (2, 4, 2, 3, 2, 1)]
    assert bd.price(t)[0] == 11
    t = bd.Trace()
    a, b, c_, d = bd.scalar_arguments(t, (), (), (), ())
    e, f = b + c_, a + d
    t.returns(bd.Scalar(t, t.emit("compare", [e.id, f.id], 2, (1,))[0]))
    assert bd.price(t)[2].tolist() == [c(d) for d in (2, 3, 2, 3, 2, 1)]
    assert bd.price(t)[0] == 11


# -----------------------------------------------------------------------------
# The original's linear-algebra table (its README and benchmarks/benchmark_linalg.py):
# each function called as f(A, x) or f(A, B) on n x n arrays, A's elements on top; each
# dot product starts from its first product and adds the later ones, s = s + a * b; the
# result (a list) is returned.


def matvec(n, **rules):
    """y[i] = A[i][0] * x[0], then + A[i][j] * x[j] for j = 1..n-1; rows in order."""
    t = bd.Trace(**rules)
    A, x = t.argument((n, n)), t.argument((n,))
    t.returns(t.dot_rows("matvec", A, np.broadcast_to(x, (n, n))))
    return t


def vecmat(n, **rules):
    """y[j] = x[0] * A[0][j], then + x[i] * A[i][j] for i = 1..n-1; columns in order."""
    t = bd.Trace(**rules)
    A, x = t.argument((n, n)), t.argument((n,))
    t.returns(t.dot_rows("vecmat", np.broadcast_to(x, (n, n)), A.T))
    return t


def matmul(n, **rules):
    """C[i][j] = A[i][0] * B[0][j], then + A[i][k] * B[k][j]; i, then j, then k."""
    t = bd.Trace(**rules)
    A, B = t.argument((n, n)), t.argument((n, n))
    t.returns(t.matmul("matmul", A, B))
    return t


def scalar_matvec(n, transposed=False):
    """matvec (or vecmat) written with Scalars statement by statement, as the original's
    benchmark writes it."""
    t = bd.Trace()
    A, x = bd.scalar_arguments(t, (n, n), (n,))
    y = []
    for i in range(n):
        term = (lambda j: x[j] * A[j][i]) if transposed else (lambda j: A[i][j] * x[j])
        s_ = term(0)
        for j in range(1, n):
            s_ = s_ + term(j)
        y.append(s_)
    t.returns(y)
    return t


def scalar_matmul(n):
    t = bd.Trace()
    A, B = bd.scalar_arguments(t, (n, n), (n, n))
    C = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            s_ = A[i][0] * B[0][j]
            for k in range(1, n):
                s_ = s_ + A[i][k] * B[k][j]
            C[i][j] = s_
    t.returns(C)
    return t


# N: (matvec, vecmat, i-j-k matmul); 2, 4, 8, 16 from its README's table, the rest of
# matvec and vecmat from its test file
ORIGINAL_TABLE = {2: (26, 25, 57), 4: (157, 150, 720), 8: (896, 832, 8867),
                  16: (5354, 4688, 109783), 3: (75, 72, None), 5: (270, 258, None),
                  6: (422, 397, None), 7: (615, 572, None)}


@pytest.mark.parametrize("n", sorted(ORIGINAL_TABLE))
def test_the_originals_linear_algebra_table(n):
    for build, expected in zip((matvec, vecmat, matmul), ORIGINAL_TABLE[n]):
        if expected is not None:
            assert bd.price(build(n))[0] == expected, (build.__name__, n)
            assert bd.price(build(n, **bd.ORIGINAL_RULES))[0] == expected


# the depths the original reports (its traced_eval) read by read at n = 2; its README's
# IR listing walks through the first
ORIGINAL_DEPTHS_2 = {
    matvec: [4, 6, 5, 6, 3, 1, 5, 3, 4, 3, 2, 1],
    vecmat: [6, 4, 6, 4, 3, 1, 3, 5, 3, 4, 2, 1],
    matmul: [4, 8, 6, 8, 4, 1, 5, 9, 5, 9, 3, 1, 8, 6, 8, 7, 3, 1, 3, 6, 3, 5, 2, 1]}


@pytest.mark.parametrize("build", [matvec, vecmat, matmul])
def test_the_originals_reads_one_by_one(build):
    assert bd.price(build(2))[2].tolist() == [c(d) for d in ORIGINAL_DEPTHS_2[build]]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_builders_match_the_statement_by_statement_version(n):
    for built, written in ((matvec(n), scalar_matvec(n)),
                           (vecmat(n), scalar_matvec(n, transposed=True)),
                           (matmul(n), scalar_matmul(n))):
        for returned in bd.RETURNED:
            assert (bd.price(built, returned)[2].tolist() ==
                    bd.price(written, returned)[2].tolist())


def test_the_earlier_rules_stay_reachable():
    # returned values dropped when dead: 25/148/828, 52/680/8609, 759 at n = 8; and with
    # the fused multiply-add as well, the i-j-k product 44/584/7713
    assert [bd.price(matvec(n), "dropped")[0] for n in (2, 4, 8)] == [25, 148, 828]
    assert [bd.price(matmul(n, returned="dropped"))[0] for n in (2, 4, 8)] == [52, 680, 8609]
    assert bd.price(vecmat(8, returned="dropped"))[0] == 759
    assert [bd.price(matmul(n, **FUSED_DROPPED))[0] for n in (2, 4, 8)] == [44, 584, 7713]
    old = bd.Trace(**bd.FUSED_FLOAT32_RULES)
    assert (old.bytes_per_value, old.multiply_add, old.returned) == (4, "fused", "dropped")
    new = bd.Trace()
    assert (new.bytes_per_value, new.multiply_add, new.returned) == (1, "separate", "live")
    with pytest.raises(ValueError):
        bd.Trace(returned="kept")
    with pytest.raises(ValueError):
        bd.Trace(multiply_add="fma")
    with pytest.raises(ValueError):
        bd.price(new, "never")


def test_returned_values_under_each_rule():
    # from the top a, b, c: t = a + b (returned), then c + c. "live": t stays, above c (2 +
    # 2); "dropped": t is dead and gone (1 + 1); "read": as live, then t read at depth 1
    for returned, total in (("live", 3 + 4), ("dropped", 3 + 2), ("read", 3 + 4 + 1)):
        t = bd.Trace(returned=returned)
        a, b, c_ = bd.scalar_arguments(t, (), (), ())
        t.returns(a + b)
        c_ + c_
        assert bd.price(t)[0] == total == plain_price(t)
    # a returned argument never read stays on the stack: from the top a, b, c; b + c reads
    # b at 2 and c at 3 (a never read, "dropped": at 1 and 2); "read" then reads a at 1;
    # marking it twice reads it once
    for returned, total in (("live", 4), ("dropped", 3), ("read", 5)):
        t = bd.Trace(returned=returned)
        a, b, c_ = bd.scalar_arguments(t, (), (), ())
        t.returns(a)
        b + c_
        t.returns([a])
        assert bd.price(t)[0] == total == plain_price(t)
    # the final reads are priced simultaneously against the final stack, under "return"
    t = matvec(3, returned="read")
    total, by_phase, per_read = bd.price(t)
    assert per_read[-3:].tolist() == [c(3), c(2), c(1)]   # y0 deepest, y2 on top
    assert by_phase == {"matvec": 75, "return": 2 + 2 + 1} and total == 80
    assert bd.price(t, "live")[1] == {"matvec": 75}


def test_multiply_then_add_order():
    # per row: p0 = a0 b0, then p_k = a_k b_k and acc = acc + p_k, two reads each
    t = bd.Trace()
    A, B = t.argument((1, 3)), t.argument((1, 3))  # ids 0..2 and 3..5
    out = t.dot_rows("d", A, B)
    _, _, read_op, read_val, out_val, _, _ = t.arrays()
    assert read_val.tolist() == [0, 3, 1, 4, 6, 7, 2, 5, 8, 9]
    assert read_op.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert out.tolist() == [out_val[4]] and t.n_ops == 5


def test_sum_ceil_sqrt_is_the_sum_of_the_bytes_costs():
    n = np.arange(0, 2000)
    assert bd.sum_ceil_sqrt(n).tolist() == list(itertools.accumulate(c(d) for d in n))
    big = np.array([10 ** 12, 10 ** 12 + 1])  # exact where float sqrt rounds
    assert (bd.sum_ceil_sqrt(big[1:]) - bd.sum_ceil_sqrt(big[:1]))[0] == 10 ** 6 + 1


@pytest.mark.parametrize("n", [2, 3, 7, 30])
def test_sum_of_n_values(n):
    # n numbers, the first on top: every step reads the running sum at depth 1 and the next
    # number at depth 2 (the ones before it are dead and gone): 3 per step, or with 4 bytes
    # a value the 8 topmost bytes, S(8) = 19
    for size, per_step in ((1, 3), (4, 19)):
        t = bd.Trace(bytes_per_value=size)
        xs = bd.scalar_arguments(t, *[()] * n)
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        assert bd.price(t)[0] == per_step * (n - 1) == S(8 if size == 4 else 2) * (n - 1)
    # an array argument, x[n-1] on top, summed from x[0] (sum_rows): x0 and x1 at depths n
    # and n-1; then step k reads the sum at 1 and x_k under the n - k numbers left
    t = bd.Trace(bytes_per_value=1)
    t.sum_rows("sum", t.argument((1, n)))
    assert bd.price(t)[0] == c(n) + c(n - 1) + sum(1 + c(n - k + 1) for k in range(2, n))


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_dot_product_of_length_n(n):
    # stack from the top: a[n-1] ... a[0], b[n-1] ... b[0]. a0 b0 reads depths n and 2n;
    # step k then reads the sum at 1, a_k at n - k + 1 and b_k at 2 (n - k) + 1
    t = bd.Trace(bytes_per_value=1, multiply_add="fused")
    t.dot_rows("dot", t.argument((1, n)), t.argument((1, n)))
    fused = c(n) + c(2 * n) + sum(1 + c(n - k + 1) + c(2 * (n - k) + 1) for k in range(1, n))
    assert bd.price(t)[0] == fused
    # multiply, then add: a_k and b_k at the same depths; the product is pushed on top of
    # the sum, so the addition reads them at 2 and 1
    t = bd.Trace()
    t.dot_rows("dot", t.argument((1, n)), t.argument((1, n)))
    separate = c(n) + c(2 * n) + sum(c(n - k + 1) + c(2 * (n - k) + 1) + 3 for k in range(1, n))
    assert bd.price(t)[0] == separate
    # as Python's sum(x * y ...): 0 + a0 b0 reads the product at 1; each later product is
    # pushed on top of the sum, so the addition reads them at 2 and 1
    t = bd.Trace(bytes_per_value=1)
    a, b = bd.scalar_arguments(t, (n,), (n,))
    sum(x * y for x, y in zip(a, b))
    python = c(n) + c(2 * n) + 1 + sum(c(n - k + 1) + c(2 * (n - k) + 1) + 3
                                       for k in range(1, n))
    assert bd.price(t)[0] == python == separate + 1


# depths of every read of C = A @ B (i-j-k loop, fused multiply-adds, one byte a value,
# C not returned: the earlier rules),
# worked out by hand stack by stack; from the top at the start: A[-1, -1] ... A[0, 0],
# then B likewise. Each entry: one operation's reads (a, b) or (sum, a, b).
MATMUL_2x2_DEPTHS = [(4, 8), (1, 6, 8), (4, 8), (1, 4, 8), (6, 4), (1, 6, 5), (2, 4), (1, 2, 3)]
MATMUL_3x3_DEPTHS = [
    (9, 18), (1, 11, 17), (1, 12, 15), (6, 18), (1, 7, 18), (1, 7, 17), (6, 18), (1, 6, 18),
    (1, 5, 17), (15, 9), (1, 16, 11), (1, 16, 12), (6, 12), (1, 7, 13), (1, 7, 13), (6, 12),
    (1, 6, 12), (1, 5, 11), (12, 9), (1, 12, 10), (1, 11, 10), (3, 9), (1, 4, 9), (1, 4, 8),
    (3, 6), (1, 3, 5), (1, 2, 3)]


@pytest.mark.parametrize("n, depths, total", [(2, MATMUL_2x2_DEPTHS, 44),
                                              (3, MATMUL_3x3_DEPTHS, 208)])
def test_matrix_product_in_i_j_k_order(n, depths, total):
    t = bd.Trace(bytes_per_value=1, **FUSED_DROPPED)
    C = t.matmul("matmul", t.argument((n, n)), t.argument((n, n)))
    cost, _, per_read = bd.price(t)
    assert per_read.tolist() == [c(d) for op in depths for d in op]
    assert cost == total == sum(c(d) for op in depths for d in op)
    assert C.shape == (n, n) and t.n_ops == n ** 3


def test_builders_read_in_numpys_order():
    t = bd.Trace()
    X = t.argument((3, 2))                       # ids 0..5, row-major
    t.sum_columns("s", X)                        # out = x[0] + x[1], then out += x[2]
    _, _, read_op, read_val, out_val, _, _ = t.arrays()
    assert read_val.tolist() == [0, 2, 1, 3, out_val[0], 4, out_val[1], 5]
    assert read_op.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for rules, first_reads in (({}, [0, 4, 1, 6, 8, 9]),    # A00 B00, A01 B10, then +
                               (FUSED_DROPPED, [0, 4, 8, 1, 6])):  # A00 B00, + A01 B10
        t = bd.Trace(**rules)
        A, B = t.argument((2, 2)), t.argument((2, 2))  # ids 0..3 and 4..7
        t.matmul("m", A, B)
        assert t.arrays()[3][:len(first_reads)].tolist() == first_reads


def random_trace(rng):
    t = bd.Trace(bytes_per_value=int(rng.integers(1, 5)),
                 returned=bd.RETURNED[int(rng.integers(0, 3))])
    values = list(t.argument((int(rng.integers(1, 6)),), size=int(rng.integers(1, 9))))
    values += list(t.argument((int(rng.integers(0, 3)),)))
    for _ in range(int(rng.integers(1, 40))):
        k = int(rng.integers(1, 4))
        inputs = [values[int(rng.integers(0, len(values)))] for _ in range(k)]  # repeats too
        values.append(t.emit("p" + str(k), inputs, k, (1,), size=int(rng.integers(1, 5)))[0])
    for _ in range(int(rng.integers(0, 4))):  # some values returned (arguments too, repeats)
        t.returns(rng.choice(values, int(rng.integers(1, 4))))
    return t


def test_fast_pricing_matches_a_plain_replay():
    rng = np.random.default_rng(0)
    for _ in range(100):
        t = random_trace(rng)
        for returned in bd.RETURNED:   # the trace's own rule, and the others
            assert bd.price(t, returned)[0] == plain_price(t, returned)
    for build in (matvec, vecmat, matmul):
        for rules in ({}, FUSED_DROPPED, dict(returned="read"), dict(bytes_per_value=3)):
            t = build(3, **rules)
            assert bd.price(t)[0] == plain_price(t)
    # whole training steps at tiny sizes, with their warm-up step
    for t in (dm.trace_ff_step(9, (3, 2), 2, negatives=True),
              dm.trace_ff_step(4, (3, 3), 1, normalize=False),
              dm.trace_backprop_step(4, (3, 2), 2)):
        assert bd.price(t)[0] == plain_price(t)


def test_later_and_vacated_earlier_against_its_definition():
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 17, 64, 200):
        end, size = rng.integers(0, 30, n), rng.integers(1, 5, n)
        F = bd.later_and_vacated_earlier(end, size)
        assert F.tolist() == [sum(size[q] for q in range(p + 1, n) if end[q] < end[p])
                              for p in range(n)]


def test_a_dead_value_leaves_the_stack():
    # from the top a, b, c, d, e. a * a reads a twice at depth 1; a is then dead and gone,
    # so e is at depth 4 (cost 2; 3 at depth 5 had a stayed), and b, c, d at 1, 2, 3
    t = bd.Trace(bytes_per_value=1)
    a, b, c_, d, e = bd.scalar_arguments(t, (), (), (), (), ())
    a * a
    t.emit("p", [e.id], 1, (1,))
    t.emit("p", [b.id, c_.id, d.id], 3, (1,))
    assert bd.price(t)[0] == (1 + 1) + 2 + (1 + 2 + 2)
    # values never read are never on the stack: c is at depth 2, not 6
    t = bd.Trace(bytes_per_value=1)
    a, *unread, c_ = bd.scalar_arguments(t, *[()] * 6)
    a + c_
    assert bd.price(t)[0] == 1 + 2


def test_measured_step_leaves_out_the_warm_up():
    t = dm.trace_backprop_step(6, (4,), 2)
    total, by_phase, _ = bd.price(t)
    m = dm.measure(t)
    assert m["cost"] == total - sum(v for k, v in by_phase.items() if k.startswith("warm-up "))
    assert 0 < m["cost"] < total and set(m["by_phase"]) == {"forward", "loss", "backward",
                                                            "update"}


# -----------------------------------------------------------------------------
# price() streams the op list block by block; price_at_once holds every read together.
# They must agree read for read whatever the blocks: cut after every read, after a few,
# or not at all


def assert_same_pricing(t, returned=None, block_reads=(1, 10 ** 9)):
    total, by_phase, per_read = bd.price_at_once(t, returned)
    for blocks in block_reads:
        got = bd.price(t, returned, block_reads=blocks)
        assert got[0] == total and got[2].tolist() == per_read.tolist(), blocks
        assert list(got[1].items()) == list(by_phase.items()), blocks   # order too
    assert bd.price(t, returned, per_read=False, block_reads=blocks) == (total, by_phase, None)


def test_streaming_pricing_equals_pricing_at_once_on_random_op_lists():
    rng = np.random.default_rng(2)
    for _ in range(30):
        t = random_trace(rng)
        for returned in bd.RETURNED:
            assert_same_pricing(t, returned)
        assert t.n_reads == len(t.arrays()[2])


def test_streaming_pricing_on_the_originals_table_and_training_steps():
    for n, expected in ORIGINAL_TABLE.items():
        for build, cost in zip((matvec, vecmat, matmul), expected):
            if cost is not None:
                assert bd.price(build(n), block_reads=5 if n <= 8 else 1000)[0] == cost
    for rules in (FUSED_DROPPED, dict(returned="read"), dict(bytes_per_value=4)):
        assert_same_pricing(matmul(3, **rules), block_reads=(2,))
    # the tracer's earlier rules, at 4 bytes a value, as data_movement prices a step
    for t in (dm.trace_ff_step(9, (3, 2), 2, negatives=True),
              dm.trace_backprop_step(6, (4, 3), 3)):
        assert_same_pricing(t, block_reads=(300,))
