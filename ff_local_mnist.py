"""Forward-Forward with hybrid negatives on locally-connected layers (Hinton 2022, section
3.2's second network): each unit sees a square block of the layer below, its weights its
own (no sharing, unlike a convolution). The paper's network has three hidden layers on
the 28 x 28 image, receptive fields 10 x 10 (stride 6), then 2 x 2 (stride 1), with
peer normalisation; it reports 1.16% test error.

Everything else is ff_hybrid_mnist.py's: this script hands its one training loop the
locally-connected layer kind (LocalConfig.layer_kinds), whose weights are blocks, one per
grid location, and whose product gathers each location's receptive field.

    python3 ff_local_mnist.py --peer-norm 0.03 --n-epochs 60 --batch-size 50 --n-blur 2 \
        --val-size 10000 --threshold 8 --top-k 3 --seed 1   # the README's row: 1.29% for seed 1
"""

import functools
import sys
from dataclasses import dataclass

import numpy as np

if __name__ == "__main__":  # one module, however it was started: ff_runs imports it by name
    sys.modules.setdefault("ff_local_mnist", sys.modules[__name__])

import ff_runs  # noqa: E402
from ff_devices import xp_of  # noqa: E402
from ff_hybrid_mnist import FFConfig  # noqa: E402
from ff_runs import option, shown  # noqa: E402

PAPER_NETWORK = "10:6:128,2:1:220,2:1:512"  # RF:STRIDE:CHANNELS of the paper's three layers


# -----------------------------------------------------------------------------
# The layers' connectivity (RF:STRIDE:CHANNELS each, no weight sharing)

def parse_local(text):
    """'10:6:64,2:1:128' -> ((10, 6, 64), (2, 1, 128)): receptive field, stride and channels
    of each locally-connected layer; '' -> () (fully connected)."""
    if not text:
        return ()
    try:
        layers = tuple(tuple(int(v) for v in part.split(":")) for part in text.split(","))
    except ValueError:
        layers = ((),)
    if any(len(layer) != 3 or min(layer) < 1 for layer in layers):
        raise ValueError(f"--local {text} must be RF:STRIDE:CHANNELS per layer, comma-separated "
                         "positive integers, e.g. 10:6:64,2:1:128,2:1:128")
    return layers


def local_layer_sizes(local, side=28):
    """Layer sizes of a locally-connected stack on the side x side image (input first)."""
    sizes, grid = [side * side], side
    for rf, stride, channels in local:
        if rf > grid:
            raise ValueError(f"--local: a receptive field of {rf} does not fit the "
                             f"{grid}x{grid} grid below it")
        grid = (grid - rf) // stride + 1
        sizes.append(grid * grid * channels)
    return tuple(sizes)


def local_masks(local, side=28):
    """The connectivity of each locally-connected layer as a float32 (n_in, n_out) mask.

    A layer's units sit on a square grid, `channels` of them at each location, ordered
    (row, column, channel); the unit at grid location (i, j) sees every channel of the
    rf x rf block of locations of the layer below that starts at (i stride, j stride).
    The image is a 28 x 28 grid with one channel. No weights are shared.
    """
    masks, grid, below = [], side, 1
    for rf, stride, channels in local:
        out = (grid - rf) // stride + 1
        mask = np.zeros((grid, grid, below, out, out, channels), np.float32)
        for i in range(out):
            for j in range(out):
                mask[i * stride:i * stride + rf, j * stride:j * stride + rf, :, i, j, :] = 1
        masks.append(mask.reshape(grid * grid * below, out * out * channels))
        grid, below = out, channels
    return masks


# A locally-connected layer is computed location by location: its weights are blocks
# (locations, fan_in, channels), one per grid location, holding exactly the weights of
# local_masks' dense form that lie inside the mask, in the same unit order.

def local_index(local, side=28):
    """The receptive fields of each locally-connected layer as an int array (locations,
    fan_in): row l lists, in increasing order, the input columns that the units at grid
    location l see (the rows of local_masks' mask that are 1 in their columns), so that
    x[:, index[l]] is location l's input."""
    indexes, grid, below = [], side, 1
    for rf, stride, channels in local:
        out = (grid - rf) // stride + 1
        columns = np.arange(grid * grid * below).reshape(grid, grid, below)
        indexes.append(np.stack([columns[i * stride:i * stride + rf, j * stride:j * stride + rf]
                                 .ravel() for i in range(out) for j in range(out)]))
        grid, below = out, channels
    return indexes


def local_fields(x, index, out=None):
    """The receptive fields of rows x, (rows, locations, fan_in): x[:, index], into out."""
    xp = xp_of(x)
    out = xp.empty((len(x),) + index.shape, x.dtype) if out is None else out
    if xp is np:  # numpy's default mode, "raise", writes through a temporary copy of out
        return np.take(x, index, axis=1, out=out, mode="clip")
    return xp.take(x, index, axis=1, out=out)


def local_product(x, blocks, index, out=None, fields=None):
    """x W of a locally-connected layer: each location's receptive field of x (gathered into
    fields) times that location's (fan_in, channels) block, one batched product
    (locations, rows, fan_in) x (locations, fan_in, channels) written through a transposed
    view straight into the (rows, locations * channels) output."""
    xp = xp_of(x, blocks)
    n_loc, _, channels = blocks.shape
    fields = local_fields(x, index, out=fields)
    out = xp.empty((len(x), n_loc * channels), x.dtype) if out is None else out
    xp.matmul(fields.transpose(1, 0, 2), blocks,
              out=out.reshape(len(x), n_loc, channels).transpose(1, 0, 2))
    return out


def local_weight_grad(fields, dz, dW):
    """dL/dW of a locally-connected layer into its blocks dW: at each location, the
    receptive field's x^T times that location's dL/dz, one batched product."""
    n_loc, _, channels = dW.shape
    return xp_of(dz).matmul(fields.transpose(1, 2, 0),
                            dz.reshape(len(dz), n_loc, channels).transpose(1, 0, 2), out=dW)


def local_blocks(W, index):
    """The entries of a dense (n_in, n_units) matrix inside each location's receptive field,
    as the blocks (locations, fan_in, channels) of a locally-connected layer."""
    xp, n_loc = xp_of(W), len(index)
    return W.reshape(len(W), n_loc, -1)[xp.asarray(index), xp.arange(n_loc)[:, None]]


def local_dense(blocks, index, n_in):
    """The dense (n_in, n_units) matrix of a locally-connected layer, 0 outside the receptive
    fields: the masked form (tests, the weight figure)."""
    xp, (n_loc, _, channels) = xp_of(blocks), blocks.shape
    W = xp.zeros((n_in, n_loc, channels), blocks.dtype)
    W[xp.asarray(index), xp.arange(n_loc)[:, None]] = blocks
    return W.reshape(n_in, n_loc * channels)


def local_stored(a, index):
    """A locally-connected layer's weights (or their optimiser state) as read from a file:
    a dense (n_in, n_units) array, as runs saved before the block form stored them, is
    gathered into blocks; anything else is returned as it is."""
    return local_blocks(a, index) if index is not None and a.ndim == 2 else a



class LocalLayer:
    """The kind of a locally-connected layer, handed to the layer maths of ff_hybrid_mnist
    (layer_forward, layer_grads, init_network, LayerWork): its receptive fields (index,
    from local_index, kept once in the memory of each array module that asks)."""

    def __init__(self, index):
        self.index = index
        self._index_in = {np: index}

    def index_in(self, xp):
        if xp not in self._index_in:
            self._index_in[xp] = xp.asarray(self.index)
        return self._index_in[xp]

    def weight_shape(self, n_out):
        return self.index.shape + (n_out // len(self.index),)

    def fields_buffer(self, n_rows, xp=np):
        return xp.empty((n_rows,) + self.index.shape, np.float32)

    def product(self, x, blocks, out=None, fields=None):
        return local_product(x, blocks, self.index_in(xp_of(x)), out, fields)

    def weight_grad(self, x, dz, dW, fields=None):
        """dW from the fields of x the forward pass gathered (gathered again when None)."""
        if fields is None:
            fields = local_fields(x, self.index_in(xp_of(x)))
        return local_weight_grad(fields, dz, dW)

    def from_dense(self, W):
        """A dense draw's weights inside the receptive fields, as blocks, scaled up by
        sqrt(n_in / fan_in) so that an input spread evenly gives the dense layer's z: the
        values the masked dense form had (the factor in float32, as that form computed it)."""
        return local_blocks(W, self.index) * np.sqrt(np.float32(len(W))
                                                     / np.float32(self.index.shape[1]))

    def stored(self, a):
        return local_stored(a, self.index)


@functools.lru_cache(maxsize=8)
def local_kinds(text):
    """The layer kinds of --local text (one LocalLayer per layer), made once per text."""
    return tuple(LocalLayer(index) for index in local_index(parse_local(text)))


# -----------------------------------------------------------------------------
# The configuration: the base one, the layers' shape and the layer kind

@dataclass
class LocalConfig(FFConfig):
    """Forward-Forward with hybrid negatives on locally-connected layers (Hinton 2022, 3.2)."""
    SCRIPT = "ff_local_mnist.py"

    local: str = option(PAPER_NETWORK, "the locally-connected layers, e.g. 10:6:64,2:1:128: each "
                        "unit sees every channel of an RF x RF block of locations below (the "
                        "image: 28 x 28, one channel), blocks STRIDE apart, CHANNELS units per "
                        "location, no weight sharing; the layer sizes follow",
                        metavar="RF:STRIDE:CHANNELS,...", check=parse_local)

    @property
    def local_layers(self):
        return parse_local(self.local)

    def derive(self):
        if not self.local_layers:
            raise ValueError("--local must give at least one layer, e.g. " + PAPER_NETWORK)
        sizes = local_layer_sizes(self.local_layers)
        # the layer sizes follow from the local layers; any other given value is refused
        if self.layer_sizes == self.__dataclass_fields__["layer_sizes"].default:
            self.layer_sizes = sizes
        elif self.layer_sizes != sizes:
            raise ValueError(f"--layer-sizes {shown(self.layer_sizes)} disagrees with "
                             f"--local {self.local}, whose layers are {shown(sizes)}; "
                             "leave --layer-sizes out")

    def layer_kinds(self):
        return list(local_kinds(self.local))


def main(argv=None):
    return ff_runs.main(LocalConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
