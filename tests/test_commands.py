"""Every command the README and docs/ show still parses: each `python3 <script>.py ...` line
(a script at the repository root) and each `python3 -m experiments.<study>.<script> ...` or
`python3 -m bench.<script> ...` line (a module of the repository's packages, run from the
root; `python3 -m pytest` and other packages' modules are not read) is checked with the
script's own --dry-run (flags, configuration and output paths, no data, no training). A
script or module that is not there fails, and so does a module of a package run by its path
(its imports need -m); one without --dry-run (bench/) only has to be there. Commands that
name an existing run (--resume DIR, --run DIR) cannot be validated without the run, so only
their flags are parsed, by the script's own parser (an experiment script's is built from its
configuration class: ff_label_mnist.py's and ff_local_mnist.py's have their own flags, and
refuse the others'). The extraction is deliberately loose so that a rewritten README keeps
working: fenced blocks (with \\ continuations) and inline code spans; a command ends at ; | &
> or #; lines with <placeholders> are skipped, `$n` becomes 2 and a lone `S` (a seed)
becomes 1. Where no GPU is, a GPU command's flags are parsed and the rest is skipped;
docs/reliability.md, a catalogue of commands that fail on purpose, is not read."""
import glob
import json
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import ff_hybrid_mnist as ff
import ff_devices
import ff_label_mnist as ff_label
import ff_local_mnist as ff_local
import ff_runs
import make_ff_hybrid_mnist_gif as gif
import visualize_ff_hybrid_mnist as viz
from experiments.analyses import refit_head
from experiments.sweeps import sweep

# a script at the root by its file name, a module of the repository's packages by its name
SCRIPTS = {"ff_hybrid_mnist.py": ff, "ff_label_mnist.py": ff_label, "ff_local_mnist.py": ff_local,
           "visualize_ff_hybrid_mnist.py": viz,
           "make_ff_hybrid_mnist_gif.py": gif, "experiments.analyses.refit_head": refit_head,
           "experiments.sweeps.sweep": sweep}
# the repository's packages: their modules run as `python3 -m PACKAGE.MODULE` from the root
PACKAGES = ("experiments", "bench")


def parser_of(script):
    """The command line of a script: an experiment script's, built from its configuration
    class; another script's own build_parser."""
    if script in ff_runs.SCRIPTS:
        parser = ff_runs.build_parser(ff_runs.config_class(script))
        parser.prog = script
        return parser
    return SCRIPTS[script].build_parser()


def code_spans(text):
    """Fenced blocks (one command per logical line) and inline spans (one command each)."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    for block in fenced:
        yield from block.replace("\\\n", " ").splitlines()
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`]+)`", rest):
        yield span.replace("\n", " ")


def commands(text):
    """(script, args): script a file name (`python3 x.py`) or a module name (`python3 -m x.y`,
    of the repository's packages only)."""
    for line in code_spans(text):
        for m in re.finditer(r"python3 (?:-m (\S+)|(\S+\.py))([^;|&#>\n]*)", line):
            module, rest = m.group(1), m.group(3)
            if module is not None and module.split(".")[0] not in PACKAGES:
                continue  # python3 -m pytest, pip, dask: not the repository's
            script = module or m.group(2)
            if "<" in rest or "..." in rest or "<" in script:
                continue
            rest = re.sub(r"\$\{?n\}?", "2", rest)
            args = ["1" if a == "S" else a for a in shlex.split(rest)]
            if any("$" in a for a in args):
                continue
            yield script, args


# docs/reliability.md shows commands that must fail, each beside the one line it gives
FAILURE_CATALOGUES = ("reliability.md",)


def documented_commands():
    found = []
    docs = [p for p in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
            if os.path.basename(p) not in FAILURE_CATALOGUES]
    for path in [os.path.join(ROOT, "README.md")] + docs:
        with open(path) as f:
            for script, args in commands(f.read()):
                shown = script if script.endswith(".py") else f"-m {script}"
                found.append(pytest.param(script, args, id=f"{os.path.basename(path)}: "
                                          f"{shown} {' '.join(args)}"[:120]))
    return found


def test_the_extraction_finds_commands_in_fences_continuations_and_spans():
    text = ("```bash\npython3 ff_hybrid_mnist.py --n-epochs 2 \\\n  --seed S   # note\n"
            "cp -r a b; python3 make_ff_hybrid_mnist_gif.py --gif x/<name>.gif\n```\n"
            "and `python3 -m experiments.analyses.refit_head --run r\n--top-k 2` inline;\n"
            "`python3 -m pytest -q` is not the repository's, `python3 -m bench.bench_epoch` is\n")
    assert list(commands(text)) == [
        ("ff_hybrid_mnist.py", ["--n-epochs", "2", "--seed", "1"]),
        ("experiments.analyses.refit_head", ["--run", "r", "--top-k", "2"]),
        ("bench.bench_epoch", [])]


@pytest.mark.parametrize("script, args", documented_commands())
def test_documented_command_parses(script, args, tmp_path, monkeypatch, capsys):
    path = script if script.endswith(".py") else script.replace(".", "/") + ".py"
    assert os.path.isfile(os.path.join(ROOT, path)), f"{path} does not exist"
    if script.endswith(".py"):  # run by its path: a module of a package imports only with -m
        assert not os.path.isfile(os.path.join(ROOT, os.path.dirname(script), "__init__.py")), (
            f"{script} is a module of a package: run it as python3 -m "
            + script[:-len(".py")].replace("/", "."))
    if script not in SCRIPTS:
        return
    module = SCRIPTS[script]
    # files the command names (a sweep list) are the repository's; outputs go to tmp_path
    args = [os.path.join(ROOT, a) if os.path.isfile(os.path.join(ROOT, a)) else a for a in args]
    monkeypatch.chdir(tmp_path)
    gpu_missing = "gpu" in args and ff_devices.gpu_problem() is not None
    if gpu_missing or "--resume" in args or "--run" in args or "-h" in args or "--help" in args:
        try:
            parser_of(script).parse_args(args)  # the run itself (or the GPU) is not here
        except SystemExit as e:
            assert e.code == 0, capsys.readouterr().err
        if gpu_missing:  # its flags parse; the configuration needs the GPU
            pytest.skip(f"a GPU command, and here {ff_devices.gpu_problem()}")
        return
    status = module.main(args + ["--dry-run"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    if script in ff_runs.SCRIPTS:  # the configuration is the script's own
        [config] = [line for line in printed.out.splitlines() if line.startswith("config: ")]
        assert json.loads(config[len("config: "):])["script"] == script
