"""ByteDMD: the data-movement cost of a computation on an idealised LRU-stack memory.

The model. The processor's memory is a stack of bytes in least-recently-used order. Reading
a byte at depth d (1 = the most recently used) costs ceil(sqrt(d)); computing and writing
are free. A value of s bytes is a contiguous block. At the start the arguments lie on the
stack, pushed from the last argument to the first (so the first is on top), an array
argument element by element in index order. An operation prices all its inputs against the
stack as it was before the operation (an input read twice is paid twice), then moves them
to the top in the order it read them, then pushes its outputs on top. A value leaves the
stack as soon as it is dead (never read again) and the rest closes up; a value that is
never read is never on it (returned values excepted: see `returned` below). sqrt(d) is
the wire length to the d-th closest byte of a memory laid out around the processor in 2D.

The rules, and the options that change them. The defaults are the rules of the original
tracer (cybertronai/ByteDMD, main branch; docs/data-movement.md names the commit); each is a
keyword argument of Trace:

- returned: what happens to the values a computation returns (marked with
  Trace.returns; values never marked are ordinary values).
    "live"     (default) they stay on the stack to the end, as if read after the last
               operation, but that read is free: while the computation runs they take up
               depth like any live value.
    "dropped"  no special treatment: a returned value leaves the stack once it is dead,
               like every other value (the rule this tracer had before).
    "read"     as "live", then every returned value (each once, however often it was
               marked) is read after the last operation, priced against the final stack
               like one more operation, under the phase "return". This is the output
               epilogue of the original's development branch; that branch also prices an
               argument's first read against a separate fixed argument stack, which this
               tracer does not model, so "read" does not reproduce that branch's totals.
- multiply_add: how the builders dot_rows (and so matmul) accumulate sum_k a_k b_k.
    "separate" (default) as the original's instruction set has it: p = a_0 b_0, then per
               further k a multiply p_k = a_k b_k (two reads) and an add acc = acc + p_k
               (two reads), two operations.
    "fused"    one three-read operation acc = acc + a_k b_k per further k (the rule this
               tracer had before).
- bytes_per_value: the size of a value whose size is not given; 1 (default, the original's
  default) or the element size (4 for float32). Values created with an explicit size=
  keep it whatever this is.

FUSED_FLOAT32_RULES holds the options that give this tracer's earlier rules (returned values
dropped when dead, fused multiply-add, 4 bytes a value); ORIGINAL_RULES spells out the
defaults. Either is meant as Trace(**rules).

Known cases, one byte a value: the dot product of [0, 1] and [2, 3] as Python's
sum(x * y ...) costs 12, and (a + b) + c costs 6; the original's linear-algebra table
(matrix-vector, vector-matrix, i-j-k matrix product at N = 2, 4, 8, 16) is reproduced
exactly under the default rules (tests/test_bytedmd.py).

Deadness needs the future, so a computation is first recorded as an op list (a Trace:
`Scalar` values with operator overloading for small cases, whole-array builders such as
`matmul` for large ones), then priced (`price`) in a streaming pass: a first pass notes the
last block of the list that reads each value, then the blocks are priced one after another,
the stack carried between them, so that memory holds one block of reads and the stack,
besides the list itself (about 4 bytes a read). `price_at_once` prices the whole list in one
pass (about 190 bytes a read at its peak); it is the reference the streaming pass is tested
against.
"""

import itertools

import numpy as np

RETURNED = ("live", "dropped", "read")
MULTIPLY_ADD = ("separate", "fused")
ORIGINAL_RULES = {"returned": "live", "multiply_add": "separate", "bytes_per_value": 1}
FUSED_FLOAT32_RULES = {"returned": "dropped", "multiply_add": "fused", "bytes_per_value": 4}


def _check_option(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")
    return value

# -----------------------------------------------------------------------------
# The op list: values, the arguments, and operations in program order


class Trace:
    """A computation as a list of operations on numbered values.

    Each operation reads some values (in order, repeats allowed) and writes new ones, and
    carries a phase name (e.g. "forward") under which its reads are priced. The builders
    (op, dot_rows, matmul, sum_rows, sum_columns, max_rows) take and return integer arrays
    of value ids and emit one operation per element, in the order the docstring says.
    The keyword arguments choose the rules (the module's docstring): returned ("live",
    "dropped" or "read"), multiply_add ("separate" or "fused") and bytes_per_value.
    """

    def __init__(self, bytes_per_value=1, *, multiply_add="separate", returned="live"):
        self.bytes_per_value = int(bytes_per_value)
        if self.bytes_per_value < 1:
            raise ValueError(f"bytes_per_value={bytes_per_value!r}: expected at least 1")
        self.multiply_add = _check_option("multiply_add", multiply_add, MULTIPLY_ADD)
        self.returned = _check_option("returned", returned, RETURNED)
        self.returned_ids = []     # id arrays marked by returns(), in call order
        self.n_values = 0
        self.value_sizes = []      # chunks: (first id, count, bytes per value)
        self.arguments = []        # id arrays, in call order
        self.n_ops = 0
        self.n_reads = 0
        self.chunks = []           # (first op, reads per operation (an int, or an array
                                   #  of one per operation), read ids (int32 where they
                                   #  fit), n_ops, phase, first output id: operation
                                   #  first + k writes it + k)
        self.phase_prefix = ""     # prepended to every phase name from here on

    # values ---------------------------------------------------------------
    def new_values(self, shape, size=None):
        n = int(np.prod(shape, dtype=np.int64))
        ids = np.arange(self.n_values, self.n_values + n, dtype=np.int64).reshape(shape)
        self.value_sizes.append((self.n_values, n, size or self.bytes_per_value))
        self.n_values += n
        return ids

    def argument(self, shape, size=None):
        """A new argument (pushed before any operation runs; see the module's docstring)."""
        ids = self.new_values(shape, size)
        self.arguments.append(ids)
        return ids

    def returns(self, *values):
        """Mark values as what the computation returns (id arrays, Scalars, or nested
        lists of them), in order; how they are priced is the `returned` rule."""
        for v in values:
            self.returned_ids.append(_value_ids(v))
        return values[0] if len(values) == 1 else values

    def returned_values(self):
        """The marked values' ids, each once, in the order first marked."""
        if not self.returned_ids:
            return np.zeros(0, np.int64)
        ids = np.concatenate(self.returned_ids)
        _, first = np.unique(ids, return_index=True)
        return ids[np.sort(first)]

    # operations -----------------------------------------------------------
    def emit(self, phase, reads, n_reads, shape, size=None):
        """prod(shape) operations with one output each (of `size` bytes; default the
        trace's): operation k reads reads[sum(n_reads[:k]):sum(n_reads[:k + 1])] in that
        order. Returns the outputs."""
        n = int(np.prod(shape, dtype=np.int64))
        n_reads = np.asarray(n_reads, np.int64)
        if n_reads.ndim == 0 or n == 0 or (n_reads == n_reads.flat[0]).all():
            n_reads = int(n_reads.flat[0]) if n_reads.size else 0   # one count for all
            total = n * n_reads
        else:
            n_reads = np.broadcast_to(n_reads, (n,))
            total = int(n_reads.sum())
            n_reads = n_reads.astype(np.min_scalar_type(int(n_reads.max())))
        reads = np.asarray(reads, np.int64).ravel()
        if len(reads) != total:
            raise ValueError(f"{len(reads)} reads given for operations that read {total}")
        if len(reads) and reads.max() < 2 ** 31:
            reads = reads.astype(np.int32)   # the stored list, kept compact
        self.chunks.append((self.n_ops, n_reads, reads, n, self.phase_prefix + phase,
                            self.n_values))
        self.n_ops += n
        self.n_reads += total
        return self.new_values(shape, size)

    def op(self, phase, *inputs, size=None):
        """One operation per element of the inputs broadcast together (None: a constant,
        free), in row-major order; element k reads input 1's k-th element, then input 2's...
        Its outputs have `size` bytes (default the trace's)."""
        arrays = np.broadcast_arrays(*[np.asarray(a) for a in inputs if a is not None])
        reads = np.stack([a.ravel() for a in arrays], axis=1)
        return self.emit(phase, reads, len(arrays), arrays[0].shape, size)

    def _chain(self, phase, first, later, m, n, step_major):
        """m chains of n operations each: step 0 of chain c reads first[c] (a row of ids),
        step j > 0 reads the output of step j - 1, then later[c, j - 1] (a row of ids).
        Chain-major order runs each chain to its end before the next; step-major order
        runs step j of every chain before step j + 1. Returns the last outputs (m,)."""
        base = self.n_values  # the outputs' ids are base + operation index
        k0, k1 = first.shape[-1], later.shape[-1] + 1
        op_index = (np.arange(n)[None, :] * m + np.arange(m)[:, None] if step_major
                    else np.arange(m)[:, None] * n + np.arange(n)[None, :])  # (chain, step)
        reads = np.full((m * n, max(k0, k1)), -1, np.int64)
        reads[op_index[:, 0], :k0] = first
        if n > 1:
            steps = op_index[:, 1:].ravel()
            reads[steps, 0] = base + op_index[:, :-1].ravel()
            reads[steps, 1:k1] = later.reshape(-1, k1 - 1)
        n_reads = np.full(m * n, k1, np.int64)
        n_reads[op_index[:, 0]] = k0
        outputs = self.emit(phase, reads[reads >= 0], n_reads, (m * n,))
        assert outputs[0] == base
        return outputs[op_index[:, -1]]

    def dot_rows(self, phase, A, B):
        """Row i of the result is sum_k A[i, k] * B[i, k], rows one after another, each
        starting from the product p_0 = A[i, 0] * B[i, 0] (reads a, then b). Then per
        further k, under multiply_add="separate": p_k = A[i, k] * B[i, k], then
        acc = acc + p_k (reads acc, then p_k; acc is p_0 at k = 1); under "fused": one
        operation acc + A[i, k] * B[i, k] (reads acc, a, b)."""
        m, n = A.shape
        if self.multiply_add == "separate":
            return self._multiply_then_add(phase, A, B)
        first = np.stack([A[:, 0], B[:, 0]], axis=1)
        later = np.stack([A[:, 1:], B[:, 1:]], axis=2)
        return self._chain(phase, first, later, m, n, step_major=False)

    def _multiply_then_add(self, phase, A, B):
        """dot_rows as two-read operations: row i is the 2n - 1 operations p_0, p_1,
        acc_1 = p_0 + p_1, p_2, acc_2 = acc_1 + p_2, ..., rows one after another."""
        m, n = A.shape
        base, per_row = self.n_values, 2 * n - 1    # the outputs' ids: base + operation
        row_start = np.arange(m, dtype=np.int64)[:, None] * per_row
        k = np.arange(n, dtype=np.int64)
        mul = row_start + np.maximum(2 * k - 1, 0)[None, :]      # (m, n): p_k's operation
        add = row_start + 2 * k[None, 1:]                         # (m, n - 1): acc_k's
        reads = np.empty((m * per_row, 2), np.int64)
        reads[mul.ravel()] = np.stack([np.asarray(A).ravel(), np.asarray(B).ravel()], axis=1)
        if n > 1:
            acc = np.concatenate([mul[:, :1], add[:, :-1]], axis=1)  # the sum before step k
            reads[add.ravel(), 0] = base + acc.ravel()
            reads[add.ravel(), 1] = base + mul[:, 1:].ravel()
        outputs = self.emit(phase, reads, 2, (m * per_row,))
        assert outputs[0] == base
        return outputs[add[:, -1] if n > 1 else mul[:, 0]]

    def matmul(self, phase, A, B):
        """C = A @ B as the i-j-k loop: each C[i, j] a dot_rows chain over k (A's element
        read before B's), the entries of C in row-major order."""
        m, p = A.shape[0], B.shape[1]
        rows = np.repeat(A, p, axis=0)           # row (i, j) holds A[i, :]
        cols = np.tile(B.T, (m, 1))              # row (i, j) holds B[:, j]
        return self.dot_rows(phase, rows, cols).reshape(m, p)

    def _reduce(self, phase, X, step_major):
        """Pairwise reduction (add or max: both read acc, then x) along axis 1 of X."""
        m, n = X.shape
        if n == 1:
            return X[:, 0].copy()
        return self._chain(phase, X[:, :2], X[:, 2:, None], m, n - 1, step_major)

    def sum_rows(self, phase, X):
        """x.sum(axis=1): each row's chain x0 + x1, + x2, ... to its end, row after row."""
        return self._reduce(phase, X, step_major=False)

    def max_rows(self, phase, X):
        """x.max(axis=1): as sum_rows, with max for +."""
        return self._reduce(phase, X, step_major=False)

    def sum_columns(self, phase, X):
        """x.sum(axis=0) as numpy runs it over a row-major array: out = x[0] + x[1], then
        out += x[2], ..., each step one pass over the columns."""
        return self._reduce(phase, X.T, step_major=True)

    # the recorded list, for price() ---------------------------------------
    def arrays(self):
        """(sizes, initial, read_op, read_val, out_val, op_phase, phases): every value's
        size in bytes, the push order of the arguments (bottom first), every read's
        operation and value, each operation's output, and its phase as an index into
        phases."""
        sizes = np.empty(self.n_values, np.int64)
        for first, n, size in self.value_sizes:
            sizes[first:first + n] = size
        initial = np.concatenate([a.ravel() for a in reversed(self.arguments)] or
                                 [np.zeros(0, np.int64)])
        phases = list(dict.fromkeys(c[4] for c in self.chunks))
        ids = np.int32 if max(self.n_values, self.n_ops) + 1 < 2 ** 31 else np.int64
        none = [np.zeros(0, ids)]
        read_op = np.concatenate([np.repeat(np.arange(first, first + n, dtype=ids), nr)
                                  for first, nr, _, n, *_ in self.chunks] or none)
        read_val = np.concatenate([rv.astype(ids) for _, _, rv, *_ in self.chunks] or none)
        out_val = np.concatenate([np.arange(out, out + n, dtype=np.int64)
                                  for *_, n, _, out in self.chunks] or none).astype(np.int64)
        op_phase = np.concatenate([np.full(n, phases.index(ph), np.int16)
                                   for *_, n, ph, _ in self.chunks] or none).astype(np.int16)
        return sizes, initial, read_op, read_val, out_val, op_phase, phases


class Scalar:
    """A traced number: +, -, * and / between Scalars (or with constants, which are free)
    record one operation each in the trace. For small hand-checkable cases."""

    __slots__ = ("trace", "id", "phase")

    def __init__(self, trace, value_id, phase="compute"):
        self.trace, self.id, self.phase = trace, int(value_id), phase

    def _apply(self, *operands):
        reads = [o.id for o in operands if isinstance(o, Scalar)]
        out = self.trace.emit(self.phase, reads, len(reads), (1,))
        return Scalar(self.trace, out[0], self.phase)

    def __add__(self, other):
        return self._apply(self, other)

    def __radd__(self, other):
        return self._apply(other, self)

    def __sub__(self, other):
        return self._apply(self, other)

    def __rsub__(self, other):
        return self._apply(other, self)

    def __mul__(self, other):
        return self._apply(self, other)

    def __rmul__(self, other):
        return self._apply(other, self)

    def __truediv__(self, other):
        return self._apply(self, other)


def scalar_arguments(trace, *shapes, size=None):
    """Arguments of the given shapes (() for a number) as nested lists of Scalars."""
    out = []
    for shape in shapes:
        ids = trace.argument(shape, size)
        out.append(Scalar(trace, ids) if ids.ndim == 0 else
                   np.vectorize(lambda i: Scalar(trace, i), otypes=[object])(ids).tolist())
    return out


def _value_ids(values):
    """The value ids in an id array, a Scalar, or nested lists/tuples of them, flattened in
    order."""
    if isinstance(values, Scalar):
        return np.array([values.id], np.int64)
    if isinstance(values, (list, tuple)):
        parts = [_value_ids(v) for v in values]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    a = np.asarray(values)
    if a.dtype == object:
        return _value_ids(a.ravel().tolist())
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"expected value ids, got an array of {a.dtype}")
    return a.astype(np.int64).ravel()


# -----------------------------------------------------------------------------
# Pricing: the LRU stack replayed in vectorised passes


def sum_ceil_sqrt(n):
    """S(n) = sum_{d=1..n} ceil(sqrt(d)), elementwise for integer arrays n >= 0: the cost of
    reading the n topmost bytes. ceil(sqrt(d)) = j for the 2j - 1 depths (j-1)^2 < d <= j^2,
    so S(n) = sum_{j<m} j (2j - 1) + m (n - (m - 1)^2) with m = ceil(sqrt(n))."""
    n = np.asarray(n, np.int64)
    r = np.floor(np.sqrt(np.maximum(n - 1, 0).astype(np.float64))).astype(np.int64)
    r += (r + 1) ** 2 <= n - 1       # exact integer floor(sqrt(n - 1)) despite rounding
    r -= r ** 2 > np.maximum(n - 1, 0)
    M = r                             # m - 1, where m = ceil(sqrt(n)) = isqrt(n - 1) + 1
    full = M * (M + 1) * (2 * M + 1) // 3 - M * (M + 1) // 2
    return np.where(n > 0, full + (M + 1) * (n - M ** 2), 0)


def later_and_vacated_earlier(end, size):
    """F[p] = sum of size[q] over slots q > p with end[q] < end[p], for every p.

    In rank order (rank: end, ties broken by slot index, so a tie never counts), a pair
    q > p with rank[q] < rank[p] first differs in some bit L of the ranks, where rank[p]
    has a 1 and rank[q] a 0, below a common prefix rank >> (L + 1). So for each bit, from
    the top: group the slots by that prefix, keep each group in slot order, and give every
    slot with a 1 the sizes of the later slots of its group with a 0; then split each
    group by the bit (a stable partition, so slot order holds) for the next bit. The
    group of prefix g holds the ranks g 2^(L+1) ... and so sits at those positions, and
    every group but the last holds 2^L slots with each bit value. O(n log n) in
    whole-array passes.
    """
    n = len(end)
    if n < 2:
        return np.zeros(n, np.int64)
    itype = np.int32 if n < 2 ** 30 else np.int64
    rank = np.empty(n, itype)
    rank[np.lexsort((np.arange(n), end))] = np.arange(n, dtype=itype)
    i = np.arange(n, dtype=itype)
    # the slots in the current order: their rank, size, and F so far
    r, w, F = rank.copy(), np.asarray(size, np.int64), np.zeros(n, np.int64)
    for L in reversed(range((n - 1).bit_length())):
        bit = (r >> L) & 1
        ones_before = np.cumsum(bit, dtype=itype) - bit
        half = (i >> (L + 1)) << L                    # slots of each bit in earlier groups
        zero_sizes = np.cumsum(w * (1 - bit))          # sizes of the 0-slots up to here
        group_end = zero_sizes[np.minimum(i | ((2 << L) - 1), n - 1)]
        F += bit * (group_end - zero_sizes)
        new_position = np.where(bit == 1, half + (1 << L) + ones_before,
                                i - ones_before + half)
        r, w, F = (_scatter(a, new_position) for a in (r, w, F))
    return F[rank]   # the final order is the rank order


def _scatter(a, new_position):
    out = np.empty_like(a)
    out[new_position] = a
    return out


def price_at_once(trace, returned=None):
    """price() computed over the whole op list at once: the same (total, by_phase,
    per_read), but every read and slot is held in memory together (about 190 bytes a read
    at the peak, measured on a training step of 14 million reads), so a trace of 100 million
    reads would need some 19 GB. Kept as the reference that price() is tested against
    (tests/test_bytedmd.py).

    Each time a value is put on top (an argument at the start, an input moved after an
    operation, an output pushed) it takes a new slot, numbered in that order; a slot is
    vacated when its value is next read (moved, or gone if dead). The bytes above a read's
    block are those of the later slots still occupied at that operation: all slots made
    after its own and before the operation, less those vacated before the operation
    (later_and_vacated_earlier). Returned values kept to the end ("live", "read") are read
    by one more operation after the last, free under "live".
    """
    returned = _check_option("returned", trace.returned if returned is None else returned,
                             RETURNED)
    sizes, initial, read_op, read_val, out_val, op_phase, phases = trace.arrays()
    n_ops, n_reads = trace.n_ops, len(read_op)
    kept = trace.returned_values() if returned != "dropped" else np.zeros(0, np.int64)
    if len(kept):  # the final operation: reads each returned value, its output never read
        read_op = np.concatenate([read_op, np.full(len(kept), n_ops, read_op.dtype)])
        read_val = np.concatenate([read_val, kept.astype(read_val.dtype)])
        out_val = np.append(out_val, len(sizes))
        sizes = np.append(sizes, 1)
        added_phase = "return" not in phases
        phases = phases + ["return"] * added_phase
        op_phase = np.append(op_phase, np.int16(phases.index("return")))
        n_ops += 1
    # reads grouped by (value, operation), groups of a value in program order
    by_value = np.argsort(read_val, kind="stable")  # read_op is already in order
    v, o = read_val[by_value], read_op[by_value]
    new_group = np.ones(len(v), bool)
    new_group[1:] = (v[1:] != v[:-1]) | (o[1:] != o[:-1])
    starts = np.flatnonzero(new_group)
    g_val, g_op, g_read = v[starts], o[starts], by_value[starts]  # g_read: its first read
    first_of_value = np.ones(len(starts), bool)
    first_of_value[1:] = g_val[1:] != g_val[:-1]
    last_of_value = np.append(first_of_value[1:], True)
    first_read = np.full(len(sizes), -1, np.int64)
    first_read[g_val[first_of_value]] = g_op[first_of_value]
    # slots: live arguments (push order), then each operation's moved inputs (read order,
    # those read again later) and its pushed output (if ever read)
    live = initial[first_read[initial] >= 0]
    moved = np.flatnonzero(~last_of_value)           # groups whose value is read again
    pushed = np.flatnonzero(first_read[out_val] >= 0)  # operations whose output is read
    made = np.concatenate([np.full(len(live), -1), g_op[moved], pushed]).astype(np.int64)
    tiebreak = np.concatenate([np.zeros(len(live), np.int64), g_read[moved],
                               np.full(len(pushed), len(read_op))])
    creation = np.lexsort((tiebreak, made))
    n_live, n_moved = len(live), len(moved)
    slot_of = np.empty(len(creation), np.int64)
    slot_of[creation] = np.arange(len(creation))     # event -> slot number
    slot_val = np.concatenate([live, g_val[moved], out_val[pushed]])[creation]
    slot_end = np.concatenate([first_read[live], g_op[moved + 1],
                               first_read[out_val[pushed]]])[creation]
    slot_size = sizes[slot_val]
    # the slot each group of reads vacates: its value's first slot (argument or output)
    # for the value's first group, else the slot its previous group moved it into
    origin = np.full(len(sizes), -1, np.int64)
    origin[live] = slot_of[:n_live]
    origin[out_val[pushed]] = slot_of[n_live + n_moved:]
    group_slot = np.empty(len(starts), np.int64)
    group_slot[first_of_value] = origin[g_val[first_of_value]]
    group_slot[moved + 1] = slot_of[n_live:n_live + n_moved]
    slot_of_read = np.empty(len(read_op), np.int64)
    slot_of_read[by_value] = group_slot[np.cumsum(new_group) - 1]
    del by_value, v, o, new_group, g_val, g_read, group_slot, slot_of, origin, slot_val
    # bytes above each read's block
    made_before = np.cumsum(np.bincount(made + 1, minlength=n_ops + 1))[read_op]
    cumulative = np.concatenate([[0], np.cumsum(slot_size)])
    vacated = later_and_vacated_earlier(slot_end, slot_size)
    above = cumulative[made_before] - cumulative[slot_of_read + 1] - vacated[slot_of_read]
    size = sizes[read_val]
    per_read = sum_ceil_sqrt(above + size) - sum_ceil_sqrt(above)
    if returned == "live":           # the final reads only kept the values on the stack
        per_read, read_op = per_read[:n_reads], read_op[:n_reads]
    phase_of_read = op_phase[read_op]
    by_phase = {ph: int(per_read[phase_of_read == i].sum()) for i, ph in enumerate(phases)}
    if returned == "live" and len(kept) and added_phase:
        del by_phase["return"]
    return int(per_read.sum()), by_phase, per_read


# -----------------------------------------------------------------------------
# Pricing in a streaming pass: the op list block by block, the stack carried between blocks

BLOCK_READS = 1 << 20   # reads a block of price() holds at once (some 200 bytes each)


def price(trace, returned=None, *, per_read=True, block_reads=BLOCK_READS):
    """(total, by_phase, per_read): the ByteDMD cost of the trace, its sum over the reads of
    each phase's operations (a dict), and each read's cost in program order (under
    returned="read" the final reads of the returned values come last, phase "return"), or
    None for per_read=False (the per-read costs of a large trace take 8 bytes a read).
    returned: the trace's rule for returned values (Trace.returns) unless given here.

    The op list is priced in blocks of consecutive operations of about block_reads reads
    each, in program order, so that memory holds one block and the stack, never every read:
    a first pass notes the last block that reads each value (whether a value outlives a
    block); then each block is priced as price_at_once prices the whole list, with the
    values on the stack at the block's start as its first slots, in stack order (bottom
    first), as if they were arguments. A slot that is still occupied at the block's end
    carries its value onto the next block's stack. The results equal price_at_once's, read
    for read, for any block_reads >= 1 (tests/test_bytedmd.py).
    """
    returned = _check_option("returned", trace.returned if returned is None else returned,
                             RETURNED)
    plan = _block_plan(trace, max(1, int(block_reads)))
    sizes = np.empty(trace.n_values + 1, np.min_scalar_type(
        max([size for *_, size in trace.value_sizes] + [1])))
    for first, n, size in trace.value_sizes:
        sizes[first:first + n] = size
    sizes[-1] = 1    # the value the final operation writes (returned values, below)
    # the last block that reads each value (1, 2, ...; 0: never read), the returned values
    # kept to the end read by a block after the last
    last_block = np.zeros(trace.n_values + 1, np.min_scalar_type(len(plan) + 1))
    for b, pieces in enumerate(plan, 1):
        for ci, _, _, r0, r1 in pieces:
            last_block[trace.chunks[ci][2][r0:r1]] = b
    kept = trace.returned_values() if returned != "dropped" else np.zeros(0, np.int64)
    last_block[kept] = len(plan) + 1
    phases = list(dict.fromkeys(c[4] for c in trace.chunks))
    if returned == "read" and len(kept) and "return" not in phases:
        phases.append("return")
    phase_index = {ph: i for i, ph in enumerate(phases)}
    initial = np.concatenate([a.ravel() for a in reversed(trace.arguments)] or
                             [np.zeros(0, np.int64)]).astype(np.int64)
    live = initial[last_block[initial] > 0]          # the stack, bottom first
    by_index, costs = [0] * len(phases), []
    blocks = (_block_arrays(trace, pieces, phase_index) for pieces in plan)
    if returned == "read" and len(kept):  # one more operation: reads each returned value
        n = trace.n_ops
        blocks = itertools.chain(blocks, [(n, np.full(len(kept), n, np.int64), kept,
                                           np.array([trace.n_values], np.int64),
                                           np.array([phase_index["return"]], np.int16))])
    for b, (first_op, read_op, read_val, out_val, op_phase) in enumerate(blocks, 1):
        cost, live = _price_block(first_op, first_op + len(out_val), read_op, read_val,
                                  out_val, live, sizes, last_block, b)
        phase_of_read = op_phase[read_op - first_op]
        for i in np.unique(phase_of_read).tolist():
            by_index[i] += int(cost[phase_of_read == i].sum())
        if per_read:
            costs.append(cost)
    by_phase = dict(zip(phases, by_index))
    per_read_costs = (np.concatenate(costs) if costs else np.zeros(0, np.int64)) if per_read \
        else None
    return sum(by_index), by_phase, per_read_costs


def _block_plan(trace, block_reads):
    """The op list cut into blocks of consecutive operations of about block_reads reads each
    (at least one operation): a list of blocks, each a list of pieces of chunks (chunk index,
    its first and end operation in the block, the first and end read of those)."""
    blocks, current, count = [], [], 0
    for ci, (_, n_reads, _, n, _, _) in enumerate(trace.chunks):
        uniform = isinstance(n_reads, int)
        offsets = None if uniform else np.concatenate([[0], np.cumsum(n_reads, dtype=np.int64)])
        lo = 0
        while lo < n:
            room = block_reads - count
            if uniform:
                hi = lo + room // n_reads if n_reads else n
            else:
                hi = int(np.searchsorted(offsets, offsets[lo] + room, side="right")) - 1
            hi = min(n, max(hi, lo + 1))
            r0, r1 = (lo * n_reads, hi * n_reads) if uniform else (int(offsets[lo]),
                                                                   int(offsets[hi]))
            current.append((ci, lo, hi, r0, r1))
            count += r1 - r0
            lo = hi
            if count >= block_reads:
                blocks.append(current)
                current, count = [], 0
    if current:
        blocks.append(current)
    return blocks


def _block_arrays(trace, pieces, phase_index):
    """(first operation, read_op, read_val, out_val, op_phase) of one block of the plan:
    each read's operation and value, each operation's output and phase index."""
    read_op, read_val, out_val, op_phase = [], [], [], []
    for ci, lo, hi, r0, r1 in pieces:
        first, n_reads, reads, _, phase, out = trace.chunks[ci]
        counts = n_reads if isinstance(n_reads, int) else n_reads[lo:hi]
        read_op.append(np.repeat(np.arange(first + lo, first + hi, dtype=np.int64), counts))
        read_val.append(reads[r0:r1].astype(np.int64))
        out_val.append(np.arange(out + lo, out + hi, dtype=np.int64))
        op_phase.append(np.full(hi - lo, phase_index[phase], np.int16))
    ci, lo = pieces[0][:2]
    return (trace.chunks[ci][0] + lo,) + tuple(map(np.concatenate, (read_op, read_val,
                                                                     out_val, op_phase)))


def _price_block(first_op, end_op, read_op, read_val, out_val, live, sizes, last_block, b):
    """The cost of each read of block b (operations first_op ... end_op - 1), and the stack
    after it (values, bottom first). live: the stack before it; last_block: the last block
    that reads each value. Slots as in price_at_once: the live values' first (made at -1,
    in stack order), then the slots the block makes; a slot that outlives the block ends
    at end_op."""
    n = len(read_val)
    by_value = np.argsort(read_val, kind="stable")   # read_op is already in order
    v, o = read_val[by_value], read_op[by_value]
    new_group = np.ones(n, bool)
    new_group[1:] = (v[1:] != v[:-1]) | (o[1:] != o[:-1])
    starts = np.flatnonzero(new_group)
    g_val, g_op, g_read = v[starts], o[starts], by_value[starts]  # g_read: its first read
    del v, o, starts
    first_of_value = np.ones(len(g_val), bool)
    first_of_value[1:] = g_val[1:] != g_val[:-1]
    last_of_value = np.append(first_of_value[1:], True)
    # the slots the block makes: moved inputs read again (in the block or after it), in
    # read order, and the pushed outputs (if ever read), each operation's after its inputs
    moved = np.flatnonzero(~last_of_value | (last_block[g_val] > b))
    pushed = np.flatnonzero(last_block[out_val] > 0)
    made = np.concatenate([g_op[moved], first_op + pushed])
    creation = np.lexsort((np.concatenate([g_read[moved], np.full(len(pushed), n)]), made))
    n_live, n_moved = len(live), len(moved)
    slot_of = np.empty(len(creation), np.int64)
    slot_of[creation] = n_live + np.arange(len(creation))      # made -> slot number
    moved_again = ~last_of_value[moved]                         # read again in the block
    moved_end = np.full(n_moved, end_op, np.int64)
    moved_end[moved_again] = g_op[moved[moved_again] + 1]
    # where each value's first group of reads in the block finds it: a live slot or a
    # pushed output's; those slots end there, the others outlive the block
    f_val, f_op = g_val[first_of_value], g_op[first_of_value]  # by value, ascending
    first_slot = np.full(len(f_val), -1, np.int64)
    ends = []
    for values, slots in ((live, np.arange(n_live)), (out_val[pushed], slot_of[n_moved:])):
        at = np.searchsorted(f_val, values)
        hit = at < len(f_val)
        hit[hit] = f_val[at[hit]] == values[hit]
        end = np.full(len(values), end_op, np.int64)
        end[hit] = f_op[at[hit]]
        first_slot[at[hit]] = slots[hit]
        ends.append(end)
    assert (first_slot >= 0).all(), "a value is read that is not on the stack"
    group_slot = np.empty(len(g_val), np.int64)
    group_slot[first_of_value] = first_slot
    group_slot[moved[moved_again] + 1] = slot_of[:n_moved][moved_again]
    slot_of_read = np.empty(n, np.int64)
    slot_of_read[by_value] = group_slot[np.cumsum(new_group) - 1]
    slot_val = np.concatenate([live, np.concatenate([g_val[moved], out_val[pushed]])[creation]])
    slot_end = np.concatenate([ends[0], np.concatenate([moved_end, ends[1]])[creation]])
    made = made[creation]
    del by_value, new_group, g_val, g_op, g_read, group_slot, slot_of, first_slot, creation
    slot_size = sizes[slot_val].astype(np.int64)
    # bytes above each read's block, as in price_at_once
    made_before = n_live + np.searchsorted(made, read_op, side="left")
    cumulative = np.concatenate([[0], np.cumsum(slot_size)])
    ended = slot_end < end_op      # a slot that outlives the block is never vacated in it
    vacated = np.zeros(len(slot_end), np.int64)
    vacated[ended] = later_and_vacated_earlier(slot_end[ended], slot_size[ended])
    above = cumulative[made_before] - cumulative[slot_of_read + 1] - vacated[slot_of_read]
    size = sizes[read_val].astype(np.int64)
    return sum_ceil_sqrt(above + size) - sum_ceil_sqrt(above), slot_val[slot_end == end_op]
