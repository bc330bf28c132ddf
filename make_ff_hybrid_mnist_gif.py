"""An animated GIF of Forward-Forward training with hybrid negatives, one frame per snapshot.

    python3 make_ff_hybrid_mnist_gif.py --n-epochs 20 --n-train 10000 --gif viz/ff_hybrid_mnist.gif

Takes ff_hybrid_mnist.py's flags (not --resume: the GIF shows a run from its first epoch; the
other scripts' flags are refused, naming their script: its frames show hybrids), trains with
ff_runs.run_experiment (the run is saved in --out, default runs/<timestamp>-<hex>, and the GIF,
unless --gif, in the run folder as training.gif) and after every --snapshot-every epochs, and
after the last, draws a
frame: a fixed real test digit and a fixed hybrid with their goodness, the goodness
histograms of a fixed evaluation set per layer on fixed bins, and the per-layer FF loss so
far with the current epoch marked. The evaluation set, goodness and histograms are
visualize_ff_hybrid_mnist.py's figure helpers, so a frame and the figures agree.
"""

import argparse
import os
import sys

import imageio.v3 as iio
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import ff_hybrid_mnist as ff
import ff_runs
import visualize_ff_hybrid_mnist as viz


def own_flags():
    own = argparse.ArgumentParser(add_help=False)
    group = own.add_argument_group(
        "animation", "--seed also seeds the evaluation set; the run is saved in --out "
        "(default runs/<timestamp>-<hex>)")
    group.add_argument("--snapshot-every", type=ff_runs.number_arg(int, 1), default=1,
                       metavar="K",
                       help="draw a frame every K FF epochs (and after the last)")
    group.add_argument("--fps", type=ff_runs.number_arg(float, 0, above=True), default=5.0,
                       help="frames per second")
    group.add_argument("--hold-final", type=ff_runs.number_arg(int, 0), default=10,
                       help="the last frame stays on screen this many frame times longer")
    group.add_argument("--gif", help="path of the GIF (default: <run folder>/training.gif)")
    group.add_argument("--n-eval", type=ff_runs.number_arg(int, 2), default=500,
                       help="real test digits and as many hybrids for the histograms")
    return own


def render_frame(cfg, state, epoch, real, hybrids, bins):
    """One frame as an (height, width, 3) uint8 array; the network is state's, now."""
    kind, norm, kinds = cfg.goodness, cfg.normalize, cfg.layer_kinds()
    g_real = viz.layer_goodness(state.weights, state.biases, real, kind, norm, kinds)
    g_hybrid = viz.layer_goodness(state.weights, state.biases, hybrids, kind, norm, kinds)
    n_layers, total = len(state.weights), ff.total_epochs(cfg)
    fig = Figure(figsize=(9, 6), dpi=80)
    canvas = FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, max(n_layers, 4))

    # the first digit and hybrid of the evaluation set, with their goodness per layer
    for col, (name, image, g) in enumerate((("real digit", real[0], g_real),
                                            ("hybrid", hybrids[0], g_hybrid))):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(image.reshape(28, 28), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("goodness " + ", ".join(f"{gl[0]:.2f}" for gl in g), fontsize=8)

    ax = fig.add_subplot(grid[0, 2:])
    losses = state.history["loss"]
    for l in range(n_layers):
        points = [(e + 1, row[l]) for e, row in enumerate(losses) if row[l] is not None]
        if points:
            line, = ax.plot(*zip(*points), label=f"layer {l + 1}")
            ax.plot(*points[-1], "o", color=line.get_color())
    ax.axvline(epoch + 1, color="k", linewidth=0.8, linestyle=":")
    ax.set_xlim(0.5, total + 0.5)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("FF epoch", fontsize=8)
    ax.set_title("FF loss per layer", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")

    for l in range(n_layers):
        ax = fig.add_subplot(grid[1, l])
        viz.draw_goodness_histogram(ax, g_real[l], g_hybrid[l],
                                    cfg.layer_threshold(cfg.layer_sizes[l + 1]), bins[l])
        ax.set_title(f"layer {l + 1}: {viz.separation(g_real[l], g_hybrid[l]):.1f} sigma",
                     fontsize=10)
        ax.xaxis.label.set_fontsize(7)
        ax.tick_params(labelsize=7)
        if l == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"Forward-Forward, hybrid negatives: epoch {epoch + 1}/{total}, "
                 f"{sum(state.history['seconds']):.0f} s of training")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def build_parser():
    return ff_runs.build_parser(ff.FFConfig, resume=False, description=__doc__.split("\n\n")[0],
                                parents=[own_flags()])


def main(argv=None):
    parser = build_parser()

    def body():
        args = parser.parse_args(argv)
        if args.n_eval > ff.N_TEST:
            raise ff_runs.SettingsError(f"--n-eval {args.n_eval} exceeds the {ff.N_TEST} "
                                        "test digits")
        ff_runs.prepare_run(args, parser)
        args.gif = args.gif or os.path.join(args.run_dir, "training.gif")
        ff_runs.check_writable(args.gif, "--gif", folder=False)
        if args.dry_run:
            ff_runs.print_dry_run(args, gif=args.gif, n_eval=args.n_eval)
            return 0
        return animate(args)
    return ff_runs.exit_status(body)


def animate(args):
    cfg, total = args.config, ff.total_epochs(args.config)
    if total == 0:
        raise ff_runs.SettingsError("--n-epochs 0 trains nothing, so the GIF would have no "
                                    "frame")
    _, _, x_test, _ = ff.load_mnist(args.data_dir)
    # a stream of its own, apart from training's (seed) and the softmax head's ([seed, 1])
    real, hybrids = viz.evaluation_set(x_test, args.n_eval,
                                       np.random.default_rng([cfg.seed, 2]), cfg.n_blur)
    bins = [viz.goodness_bins(cfg.layer_threshold(n)) for n in cfg.layer_sizes[1:]]
    frames = []

    def snapshot(epoch, state):
        if (epoch + 1) % args.snapshot_every and epoch + 1 != total:
            return
        frames.append(render_frame(cfg, state, epoch, real, hybrids, bins))
        print(f"frame {len(frames)}: epoch {epoch + 1}/{total}", flush=True)

    ff_runs.run_experiment(args, callback=snapshot)
    # Pillow merges identical consecutive frames into one longer frame anyway, so the hold is
    # written as the last frame's duration rather than as copies. One frame takes one number:
    # Pillow 13 fails on a list of one duration.
    frame_ms = 1000 / args.fps
    durations = [frame_ms] * (len(frames) - 1) + [frame_ms * (1 + args.hold_final)]
    os.makedirs(os.path.dirname(args.gif) or ".", exist_ok=True)
    # a failed write (a full disk) is one line naming the file; the writer's own clean-up
    # would otherwise print "Exception ignored" tracebacks as its objects are collected
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        ff_runs.atomic_write(args.gif, lambda f: iio.imwrite(
            f, np.stack(frames), extension=".gif",
            duration=durations if len(frames) > 1 else durations[0], loop=0))
    except OSError as e:
        raise ff_runs.DataError(f"could not write {args.gif} ({e.strerror or e}); the run is "
                                f"saved in {args.run_dir}") from None
    finally:
        sys.unraisablehook = hook
    print(f"wrote {args.gif}: {len(frames)} frames, "
          f"{os.path.getsize(args.gif) / 1e6:.1f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
