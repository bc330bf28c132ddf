"""Reading the records the experiments write (JSON lines from experiments/sweeps/sweep.py, JSON
files from experiments/data_movement/data_movement.py), for the scripts that summarise and
plot them, and checking their output paths: a missing or unreadable file, bytes that are not
UTF-8, a line that is not JSON or not the right kind of record, a field of the wrong type,
or nothing finished to show ends the script with one line naming the file (and line) instead
of a traceback, and before anything is computed or drawn."""
import argparse
import json
import os
import sys


class RecordsError(Exception):
    """A results file that cannot be used; the scripts print it as one line and exit 1."""


class OneLineParser(argparse.ArgumentParser):
    """Bad flags exit 2 with one line, `error: ...`, instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


# -----------------------------------------------------------------------------
# The shape a record must have. A spec is a type (int: an integer, float: any number, never
# a bool, which JSON readers turn true into), None (null), a tuple (any one of them), [spec]
# (a list of them) or {key: spec} (an object with those keys; "key?" may be missing, "*"
# stands for every key). Keys not named are free: newer writers add fields.

NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
         None: "null", dict: "an object", list: "a list"}


def describe(spec):
    if isinstance(spec, tuple):
        return " or ".join(map(describe, spec))
    return NAMES[type(spec) if isinstance(spec, (dict, list)) else spec]


def fits(value, spec):
    """Whether value has spec's type (one level: the items are checked by mismatch)."""
    if isinstance(spec, tuple):
        return any(mismatch(value, s) is None for s in spec)
    if spec is None:
        return value is None
    kind = type(spec) if isinstance(spec, (dict, list)) else spec
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def mismatch(value, spec, name="the record"):
    """What is wrong with value against spec (naming the field, e.g. metrics.test_error), or
    None when it fits."""
    if not fits(value, spec):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return f"{name} is {shown}, not {describe(spec)}"
    if isinstance(spec, list):
        items = ((f"{name}[{i}]", v) for i, v in enumerate(value))
        return next(filter(None, (mismatch(v, spec[0], n) for n, v in items)), None)
    if not isinstance(spec, dict):
        return None
    prefix = "" if name == "the record" else name + "."
    for key, sub in spec.items():
        keys = value if key == "*" else [key.rstrip("?")]
        for k in keys:
            if k not in value:
                if key.endswith("?"):
                    continue
                return f"no {prefix}{k}"
            problem = mismatch(value[k], sub, prefix + str(k))
            if problem:
                return problem
    return None


# -----------------------------------------------------------------------------
# Reading files


def read_text(path):
    """The file's text; a file that cannot be read, or is not UTF-8 text, is refused."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RecordsError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:  # name the line: a damaged record is found by it
        line = data.count(b"\n", 0, e.start) + 1
        raise RecordsError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); "
                           "not a record written by these scripts") from None


def read_json(path, spec, kind):
    """The JSON file at path, refused unless it has spec's fields; kind says what it should
    be (e.g. "the record of `data_movement.py grid`")."""
    try:
        value = json.loads(read_text(path))
    except ValueError as e:
        raise RecordsError(f"{path}: not JSON ({e}); expected {kind}") from None
    problem = mismatch(value, spec)
    if problem:
        raise RecordsError(f"{path}: not {kind} ({problem})")
    return value


class Record(dict):
    """A sweep record that knows where it was read (`where`: "path:line"), for messages."""
    where = "a record"


RECORD = {"label": str, "rc": (int, None), "status?": str, "args?": [str],
          "metrics?": (dict, None), "commit?": (str, None)}
FINISHED = {"args": [str], "metrics": dict}  # what any script reads of a finished run


def is_finished(record):
    return record.get("rc") == 0 and isinstance(record.get("metrics"), dict)


def read_records(paths, finished_spec=None):
    """Every sweep record of the files, in order, as Records; blank lines are skipped.
    The records of finished runs must also fit finished_spec (the fields the script reads).
    A label recorded more than once is counted once: see one_per_label."""
    records = []
    for path in paths:
        for n, line in enumerate(read_text(path).split("\n"), 1):
            if line.strip():
                records.append(parse_record(line, f"{path}:{n}", finished_spec))
    return one_per_label(records)


def parse_record(line, where, finished_spec):
    try:
        record = json.loads(line)
    except ValueError:
        raise RecordsError(f"{where}: not a JSON record (cut short?)") from None
    if not isinstance(record, dict):
        raise RecordsError(f"{where}: not a sweep.py record (not a JSON object)")
    record = Record(record)
    for spec in (RECORD, FINISHED, finished_spec) if is_finished(record) else (RECORD,):
        problem = spec and mismatch(record, spec)
        if problem:
            raise RecordsError(f"{where}: not a sweep.py record of a run ({problem})")
    record.where = where
    return record


def one_per_label(records):
    """One record per label, in file order: its last finished one, else its last. A label is
    one run (recorded again when a sweep resumes or extends it, or a file is given twice):
    counting two of its records would count one seed twice. Where two finished, a warning
    says which is used."""
    chosen = {}
    for r in records:
        if r["label"] not in chosen or is_finished(r) or not is_finished(chosen[r["label"]]):
            chosen[r["label"]] = r
    for label, r in chosen.items():
        others = [x.where for x in records if x["label"] == label and is_finished(x) and x is not r]
        if others:
            print(f"warning: label {label} is recorded more than once ({', '.join(others)}, "
                  f"{r.where}); only {r.where} is used", file=sys.stderr)
    return [r for r in records if chosen[r["label"]] is r]


def finished(records):
    """The records of runs that ended with metrics."""
    return [r for r in records if is_finished(r)]


# -----------------------------------------------------------------------------
# A run's flags


def pairs(args):
    """CLI arguments as (flag, value) pairs, value None for a switch; a repeated flag
    (a sweep line overriding its base) keeps its last value."""
    out, i = {}, 0
    while i < len(args):
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        out.pop(args[i], None)
        out[args[i]] = args[i + 1] if has_value else None
        i += 2 if has_value else 1
    return list(out.items())


def option(record, name, default):
    """The value of the run's flag (its last occurrence, as argparse reads it) as the
    default's type; a value that is not one is refused, naming the record."""
    value = dict(pairs(record["args"])).get(name, default)
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise RecordsError(f"{record.where}: {name} {value} is not "
                           f"{describe(type(default))}") from None


def one_experiment(records, flag, default, expects):
    """Refuse records that are not one sweep over flag: runs that differ in another flag,
    or two runs with the same value of it (one point drawn twice). expects: what the
    script reads, for the message."""
    seen = {}
    for r in records:
        diff = differences(records[0], r, ignore=(flag,))
        if diff:
            raise RecordsError(f"{records[0].where} and {r.where} differ in {'; '.join(diff)}, "
                               f"not in {flag} alone: {expects}")
        twin = seen.setdefault(option(r, flag, default), r)
        if twin is not r:
            raise RecordsError(f"{twin.where} and {r.where} are both {flag} "
                               f"{option(r, flag, default)}: {expects}")


def differences(a, b, ignore=()):
    """The flags, other than those in ignore, whose values differ between records a and b,
    as "--flag x vs y" ("not given" where a record lacks it); numbers compare as numbers."""
    fa, fb = dict(pairs(a["args"])), dict(pairs(b["args"]))

    def number(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v
    return [f"{flag} {fa.get(flag, 'not given')} vs {fb.get(flag, 'not given')}"
            for flag in dict.fromkeys(list(fa) + list(fb))
            if flag not in ignore and number(fa.get(flag, "-")) != number(fb.get(flag, "-"))]


# -----------------------------------------------------------------------------
# Output paths


def check_out(path, flag="--out"):
    """Refuse an output file that could not be written, before anything is computed: the
    trainer's checks (a folder where the file goes, a path below a file, a folder that
    cannot be written: a real probe write) and, since these scripts write one file and make
    no folder, a folder that does not exist."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        raise RecordsError(f"{flag} {path}: the folder {folder} does not exist")
    import ff_runs  # imported here: summarize needs no trainer
    try:
        ff_runs.check_writable(path, flag, folder=False)
        if os.path.isfile(path):  # the probe wrote in the folder; the file may be read-only
            open(path, "a").close()
    except ff_runs.SettingsError as e:
        raise RecordsError(str(e)) from None
    except OSError as e:
        raise RecordsError(f"{flag} {path} cannot be written ({e.strerror or e})") from None


def check_figure(path, flag="--out"):
    """check_out, and a suffix matplotlib can write (else savefig fails after the drawing,
    or appends .png to a path without one)."""
    check_out(path, flag)
    from matplotlib.backend_bases import FigureCanvasBase
    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = os.path.splitext(path)[1][1:].lower()
    if suffix not in kinds:
        raise RecordsError(f"{flag} {path}: give a file name ending in one of "
                           f"{', '.join('.' + k for k in sorted(kinds))}")


def main_of(body):
    """body() with a RecordsError as one line on stderr and exit status 1."""
    try:
        return body() or 0
    except RecordsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
