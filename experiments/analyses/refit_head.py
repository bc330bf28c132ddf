"""Refit the linear softmax head of a saved run, FF network unchanged: the converged head
(the trainer's default read-out) or the SGD head with other settings.

Separates how much of the test error is the head's from how much is the features'. The
run's own validation split is used (or --val-size); the converged head chooses its penalty
on it, and SGD settings are to be chosen on val_error, never on test_error. The record (one
JSON line on stdout, --out appends it to a file) is what the trainer's own read-out of the
same network gives: the head reads the saved weights exactly as the run would have.

    python3 -m experiments.analyses.refit_head --run runs/spec-seed0          # converged head
    python3 -m experiments.analyses.refit_head --run runs/spec-seed0 --head sgd --softmax-lr 0.5
"""

import argparse
import dataclasses
import json
import os
import sys
import types

import ff_hybrid_mnist as ff
import ff_runs


def strengths_arg(text):
    parse = ff_runs.number_arg(float, 0, above=True)
    values = tuple(parse(s) for s in text.split(","))
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text} names a value twice")
    return values


def head_defaults(config_class):
    """The trainer's defaults of config_class's fields (the head's are every script's)."""
    return {name: f.default for name, f in config_class.__dataclass_fields__.items()}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = head_defaults(ff.FFConfig)  # the run, and so its script, is not known yet
    p.add_argument("--run", required=True, help="saved run whose head is refitted, or a run in progress (its "
                   "checkpoint's network)")
    p.add_argument("--head", choices=ff.HEADS, default=d["head"],
                   help="lbfgs: the converged head; sgd: minibatch SGD (default: %(default)s)")
    p.add_argument("--head-c", type=strengths_arg, default=ff.HEAD_C, metavar="C,C,...",
                   help="the converged head's values of C (penalty |W|^2 / 2C on the summed "
                   "cross-entropy) to choose among on validation (default: "
                   + ",".join(f"{v:g}" for v in ff.HEAD_C) + ")")
    p.add_argument("--label", help="names the run in the record (default: the run folder's name)")
    p.add_argument("--out", help="JSON-lines file the record is appended to (it is also printed)")
    p.add_argument("--into", metavar="DIR", help="also save the run with this head as a new run "
                   "folder DIR (the FF weights and history copied, the head, its history and "
                   "the metrics new): what the trainer writes with these head settings, for the "
                   "figure scripts")
    p.add_argument("--softmax-epochs", type=ff_runs.number_arg(int, 1),
                   default=d["softmax_epochs"],
                   help="with --head sgd: epochs of the new head (default: %(default)s, the "
                   "trainer's default, not the run's own)")
    p.add_argument("--softmax-lr", type=ff_runs.number_arg(float, 0, above=True),
                   default=d["softmax_lr"], help="with --head sgd: its step size "
                   "(default: %(default)s, the trainer's default, not the run's own)")
    p.add_argument("--softmax-weight-decay", type=ff_runs.number_arg(float, 0),
                   default=d["softmax_weight_decay"], help="with --head sgd: its L2 "
                   "penalty (default: %(default)s, the trainer's default, not the run's own)")
    p.add_argument("--top-k", type=ff_runs.number_arg(int, 1), help="default: the run's own")
    p.add_argument("--val-size", type=ff_runs.number_arg(int, 0), help="default: the run's own")
    p.add_argument("--seed", type=ff_runs.number_arg(int, 0), default=d["seed"],
                   help="seeds the head's batches, as [seed, 1] (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the flags and the run, print the settings, exit")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        run = ff_runs.load_network(args.run)  # its configuration is of its script's class
        d = head_defaults(type(run.cfg))
        # the run's configuration with this refit's head settings, checked as a whole
        sgd = args.head == "sgd"
        if not sgd and (args.softmax_lr != d["softmax_lr"]
                        or args.softmax_weight_decay != d["softmax_weight_decay"]):
            raise ValueError("--softmax-lr and --softmax-weight-decay need --head sgd")
        cfg = dataclasses.replace(
            run.cfg, top_k=args.top_k or run.cfg.top_k, seed=args.seed, head=args.head,
            softmax_epochs=args.softmax_epochs,
            softmax_lr=args.softmax_lr if sgd else d["softmax_lr"],
            softmax_weight_decay=args.softmax_weight_decay if sgd else d["softmax_weight_decay"],
            val_size=run.cfg.val_size if args.val_size is None else args.val_size)
        if args.into:
            ff_runs.check_writable(args.into, "--into")
            if os.path.exists(args.into) and os.listdir(args.into):
                raise ff_runs.SettingsError(f"--into {args.into} is not empty; give a new "
                                            "folder")
        if args.out:
            ff_runs.check_writable(args.out, "--out", folder=False)
            if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
                raise ff_runs.SettingsError(f"--out {args.out}: its folder does not exist")
    except ValueError as e:
        p.error(str(e))
    except ff_runs.SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ff_runs.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(json.dumps({"run": args.run, "config": ff_runs.config_record(cfg)}, indent=1))
        return 0
    try:
        x_train, y_train, x_test, y_test = ff.load_mnist()
        x_fit, y_fit, x_val, y_val = ff.split_validation(x_train, y_train, cfg.val_size,
                                                         run.cfg.n_train)
        splits = [s for s in (("val", x_val, y_val), ("test", x_test, y_test)) if len(s[1])]
        head, history, metrics = ff.fit_head(run.weights, run.biases, cfg, (x_fit, y_fit), splits,
                                             log=lambda *a, **k: print(*a, file=sys.stderr,
                                                                       **k),
                                             strengths=args.head_c)
    except (ff_runs.DataError, ff_runs.TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # run_config names the script that made the run ("script") beside its fields: what
    # ff_runs.run_config reads back into the right configuration class
    result = {"script": "experiments/analyses/refit_head.py",
              "label": args.label or os.path.basename(os.path.normpath(args.run)),
              "run": args.run, "run_config": ff_runs.config_record(run.cfg),
              "ff_epochs": len(run.ff_history["loss"]), "head": cfg.head, "top_k": cfg.top_k,
              "val_size": cfg.val_size, "val_error": metrics.get("val_error"),
              "test_error": metrics["test_error"], "train_error": metrics["train_error"],
              "seconds": metrics["softmax_seconds"], "environment": ff_runs.environment()}
    if cfg.head == "sgd":
        result.update(softmax_epochs=cfg.softmax_epochs, softmax_lr=cfg.softmax_lr,
                      softmax_weight_decay=cfg.softmax_weight_decay)
    else:
        result.update(head_c_tried=list(args.head_c), head_C=history["C"],
                      head_weight_decay=history["weight_decay"],
                      chosen_on=history["chosen_on"], head_converged=metrics["head_converged"],
                      head_iterations=metrics["head_iterations"],
                      fits=[{k: f[k] for k in ("C", "weight_decay", "choice_error",
                                                          "iterations", "grad_max", "converged",
                                                          "seconds") if k in f}
                                       for f in history["fits"]])
    if args.into:
        os.makedirs(args.into, exist_ok=True)
        frozen = types.SimpleNamespace(weights=run.weights, biases=run.biases,
                                       history=run.ff_history)
        ff_runs.save_run(args.into, cfg, frozen, head, history,
                         {**run.metrics, **metrics, "run_dir": args.into,
                          "refitted_from": args.run}, run.environment)
        result["into"] = args.into
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
