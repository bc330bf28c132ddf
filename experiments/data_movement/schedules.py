"""Schedules: the same arithmetic of a training step in other orders of operations.

data_movement.py writes FF's and backprop's steps as the element operations numpy performs,
in numpy's order. The data a step moves depends on that order as much as on the algorithm,
so each step builder takes a Schedule, which decides two things:

- Adam: numpy's ten passes over each parameter, chunk by chunk as adam_cpu runs them
  ("passes"), or one fused pass ("fused") that per element makes the new m from (g, m),
  the new v from (g, v) and the new weight from (p, m, v): the weight, the gradient and both
  moments read once from wherever they lie, g and the new moments once more from the top of
  the stack (a kernel keeps them in registers; ByteDMD has none, so they cost a read of
  depth 1-3 each).
- Products: the i-j-k loop over the whole matrices (tile 0), or cache-blocked: C = A B
  computed tile by tile of C (T x T, tiles in row-major order), each tile's sum over k in
  blocks of T (a T x T x T i-j-k product added into the running tile), as a blocked kernel
  keeps its three tiles in cache. Every product's multiplies and adds are the same; only
  their order and so the depths of the reads change.

- Backprop's updates: numpy's order, every W and then every b once the backward pass is
  done ("after"), or each layer's W and b as soon as the backward pass has made their
  gradients ("as-made"), while the gradients are on top of the stack.

FF's order is already layer-local (each layer's forward pass, loss, gradient and update
come before the layer above reads its output; nothing of a layer is read after that), and
backprop's backward pass already reads the activities in the reverse order of the forward
pass, the most recent first, the order an LRU stack keeps them in. So "best" (fused Adam,
tiled products, updates as made) is each algorithm's best schedule here; for FF it is the
same op list as "tiled".
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedule:
    name: str
    adam: str = "passes"   # "passes" or "fused"
    tile: int = 0          # 0: whole i-j-k products; T: T x T tiles
    update: str = "after"  # backprop's: "after" the backward pass, or "as-made"

    def matmul(self, t, phase, A, B):
        return t.matmul(phase, A, B) if not self.tile else tiled_matmul(t, phase, A, B,
                                                                          self.tile)


NUMPY = Schedule("numpy")
SCHEDULES = {s.name: s for s in (NUMPY, Schedule("fused-adam", adam="fused"),
                                 Schedule("tiled", adam="fused", tile=16),
                                 Schedule("best", adam="fused", tile=16, update="as-made"))}


def tiled_matmul(t, phase, A, B, T):
    """C = A @ B tile by tile of C (T x T, row-major over tiles); a tile's sum over k in
    blocks of T: the first block's i-j-k product is the running tile, each later block's
    product is added into it element by element."""
    (m, n), p = A.shape, B.shape[1]
    C = np.empty((m, p), np.int64)
    for i in range(0, m, T):
        for j in range(0, p, T):
            tile = None
            for k in range(0, n, T):
                part = t.matmul(phase, A[i:i + T, k:k + T], B[k:k + T, j:j + T])
                tile = part if tile is None else t.op(phase, tile, part)
            C[i:i + T, j:j + T] = tile
    return C


def fused_adam(t, p, g, m, v, phase="update"):
    """Adam as one pass over the elements: per element three operations in turn, m' from
    (g, m), v' from (g, v), p' from (p, m', v'). Returns (p', m', v')."""
    shape, n = p.shape, p.size
    p, g, m, v = (np.asarray(a).ravel() for a in (p, g, m, v))
    base = t.n_values  # operation 3e + k of this emit writes value base + 3e + k
    e = np.arange(n, dtype=np.int64)
    reads = np.stack([g, m, g, v, p, base + 3 * e, base + 3 * e + 1], axis=1)
    out = t.emit(phase, reads, np.tile([2, 2, 3], n), (3 * n,))
    assert out[0] == base
    return tuple(out[k::3].reshape(shape) for k in (2, 0, 1))
