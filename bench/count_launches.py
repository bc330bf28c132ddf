"""What one training step asks of a GPU, counted on the CPU: array operations (kernel
launches), host-to-device copies and reads back per step of `train_ff` and of the softmax
head, by running them over tests/counting_cupy.py's numpy-backed stand-in for CuPy. A
step's count is an epoch of 4 steps minus one of 2, halved, so once-an-epoch work cancels.
tests/test_gpu.py holds these counts to budgets.

    python3 -m bench.count_launches             # hybrid, label, the recipe, the head
    python3 -m bench.count_launches --by-name   # and which operations they are
"""
import argparse

import ff_hybrid_mnist as ff
import ff_label_mnist as ff_label
from tests.counting_cupy import ff_step_counts, head_step_counts  # tests/: a namespace package

KINDS = {  # configuration class and settings; the widths do not change the counts, the depth does
    "hybrid negatives, 4 layers": (ff.FFConfig, dict(layer_sizes=(784, 24, 24, 24, 24))),
    "label negatives, 3 layers": (ff_label.LabelConfig, dict(layer_sizes=(784, 24, 24, 24))),
    "the recipe (hard from head), 3 layers": (ff_label.LabelConfig, dict(
        layer_sizes=(784, 24, 24, 24), hard_negatives=True, hard_from="head", optimizer="sgd",
        normalize="rms", init="fan-in", goodness="sum", threshold=1.0, peer_kind="author",
        peer_norm=0.06)),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--by-name", action="store_true", help="list the operations of a step")
    a = p.parse_args()
    rows = [(kind, ff_step_counts(ff, settings, config_class=config_class))
            for kind, (config_class, settings) in KINDS.items()]
    rows.append(("softmax head", head_step_counts(ff)))
    for kind, (counts, calls) in rows:
        print(f"{kind:40s} per step: {counts['ops']:6.1f} operations  "
              f"{counts['uploads']:4.1f} uploads  {counts['reads']:4.1f} reads back")
        if a.by_name:
            print("    " + ", ".join(f"{k} {v:g}" for k, v in
                                     sorted(calls.items(), key=lambda kv: (-kv[1], kv[0]))))


if __name__ == "__main__":
    main()
