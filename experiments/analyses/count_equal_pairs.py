"""How often does a hybrid mix a digit with itself? Replays the random draws of a run.

train_ff draws a and b from two independent permutations, so a pair can hold the same
digit twice (then the "hybrid" is a real digit). This replays exactly the generator
stream of `ff_hybrid_mnist.py --seed S` (three permutations per epoch, then the bytes of
one mask batch per step) and counts the pairs with a == b, and with byte-identical images.

    python3 -m experiments.analyses.count_equal_pairs --seed 0 --n-epochs 30
"""
import argparse
import json

import numpy as np

import ff_hybrid_mnist as ff
import ff_runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-epochs", type=int, default=30)
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--layer-sizes", type=ff_runs.layer_sizes_arg, default=ff.FFConfig().layer_sizes)
    args = p.parse_args(argv)
    x = ff.load_mnist()[0][:args.n_train]
    rng = np.random.default_rng(args.seed)
    ff.init_network(args.layer_sizes, rng)  # the draws FFState.fresh makes first
    n, B = len(x), args.batch_size
    mask_bytes = -(-B * 784 // 8)
    same_index = same_image = pairs = 0
    for _ in range(args.n_epochs):
        pos, pa, pb = rng.permutation(n), rng.permutation(n), rng.permutation(n)
        for i in range(n // B):
            rng.bytes(mask_bytes)
        used = slice(0, (n // B) * B)
        same_index += int(np.sum(pa[used] == pb[used]))
        same_image += int(np.sum(np.all(x[pa[used]] == x[pb[used]], axis=1)))
        pairs += (n // B) * B
    print(json.dumps({"seed": args.seed, "n_epochs": args.n_epochs, "pairs": pairs,
                      "same_index": same_index, "same_image": same_image,
                      "rate_same_index": same_index / pairs}))


if __name__ == "__main__":
    main()
