"""ByteDMD cost model: known cases, closed forms worked out by hand, and the fast pricing
against a plain list-based replay of the definition on random op lists."""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
import bytedmd as bd  # noqa: E402
import data_movement as dm  # noqa: E402


def c(d):
    """The cost of one byte at depth d."""
    return math.ceil(math.sqrt(d))


def S(n):
    """The cost of the n topmost bytes, summed one by one."""
    return sum(c(d) for d in range(1, n + 1))


def plain_price(trace):
    """The definition replayed on a Python list (top = end of the list): every read is
    priced against the stack before its operation, then the inputs move to the top in read
    order (or leave it, if never read again), then the output is pushed (if ever read)."""
    sizes, initial, read_op, read_val, out_val, _, _ = trace.arrays()
    last = {}
    reads = {}
    for o, v in zip(read_op.tolist(), read_val.tolist()):
        last[v] = o
        reads.setdefault(o, []).append(v)
    stack = [v for v in initial.tolist() if v in last]
    total = 0
    for o in range(trace.n_ops):
        for v in reads.get(o, []):
            above = sum(sizes[u] for u in stack[stack.index(v) + 1:])
            total += S(above + sizes[v]) - S(above)
        for v in dict.fromkeys(reads.get(o, [])):
            stack.remove(v)
            if last[v] > o:
                stack.append(v)
        if last.get(int(out_val[o]), -1) > o:
            stack.append(int(out_val[o]))
    return total


def test_known_cases():
    t = bd.Trace(bytes_per_value=1)
    a, b = bd.scalar_arguments(t, (2,), (2,))
    sum(x * y for x, y in zip(a, b))     # Python's sum starts from 0: 0 + a0 b0 is an operation
    assert bd.price(t)[0] == 12
    t = bd.Trace(bytes_per_value=1)
    a, b, c_ = bd.scalar_arguments(t, (), (), ())
    (a + b) + c_
    assert bd.price(t)[0] == 6


def test_sum_ceil_sqrt_is_the_sum_of_the_bytes_costs():
    n = np.arange(0, 2000)
    assert bd.sum_ceil_sqrt(n).tolist() == [S(k) for k in n]
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
    t = bd.Trace(bytes_per_value=1)
    t.dot_rows("dot", t.argument((1, n)), t.argument((1, n)))
    fused = c(n) + c(2 * n) + sum(1 + c(n - k + 1) + c(2 * (n - k) + 1) for k in range(1, n))
    assert bd.price(t)[0] == fused
    # as Python's sum(x * y ...): 0 + a0 b0 reads the product at 1; each later product is
    # pushed on top of the sum, so the addition reads them at 2 and 1
    t = bd.Trace(bytes_per_value=1)
    a, b = bd.scalar_arguments(t, (n,), (n,))
    sum(x * y for x, y in zip(a, b))
    python = c(n) + c(2 * n) + 1 + sum(c(n - k + 1) + c(2 * (n - k) + 1) + 3
                                       for k in range(1, n))
    assert bd.price(t)[0] == python


# depths of every read of C = A @ B (i-j-k loop, fused multiply-adds, one byte a value),
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
    t = bd.Trace(bytes_per_value=1)
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
    t = bd.Trace()
    A, B = t.argument((2, 2)), t.argument((2, 2))  # ids 0..3 and 4..7
    t.matmul("m", A, B)                            # C[0, 0] = A00 B00, + A01 B10, ...
    read_val = t.arrays()[3]
    assert read_val[:5].tolist() == [0, 4, 8, 1, 6]


def random_trace(rng):
    t = bd.Trace(bytes_per_value=int(rng.integers(1, 5)))
    values = list(t.argument((int(rng.integers(1, 6)),), size=int(rng.integers(1, 9))))
    values += list(t.argument((int(rng.integers(0, 3)),)))
    for _ in range(int(rng.integers(1, 40))):
        k = int(rng.integers(1, 4))
        inputs = [values[int(rng.integers(0, len(values)))] for _ in range(k)]  # repeats too
        values.append(t.emit("p" + str(k), inputs, k, (1,), size=int(rng.integers(1, 5)))[0])
    return t


def test_fast_pricing_matches_a_plain_replay():
    rng = np.random.default_rng(0)
    for _ in range(150):
        t = random_trace(rng)
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
