"""Reading the JSON-lines results files that experiments/sweep.py writes, for the scripts that
summarise and plot them: a missing file, a line that is not JSON or not a record, or nothing
finished to show ends the script with one line (exit 1) instead of a traceback."""
import json
import os
import sys


class RecordsError(Exception):
    """A results file that cannot be used; the scripts print it as one line and exit 1."""


def read_records(paths):
    """Every record of the files, in order; blank lines are skipped."""
    records = []
    for path in paths:
        try:
            with open(path) as f:
                lines = f.readlines()
        except OSError as e:
            raise RecordsError(f"{path}: cannot be read ({e.strerror or e})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise RecordsError(f"{path}:{n}: not a JSON record (cut short?)") from None
            if not isinstance(record, dict) or "label" not in record:
                raise RecordsError(f"{path}:{n}: not a sweep record (no label)")
            records.append(record)
    return records


def finished(records):
    """The records of runs that ended with metrics."""
    return [r for r in records if r.get("rc") == 0 and isinstance(r.get("metrics"), dict)]


def check_out(path):
    """Refuse an output file whose folder does not exist, before anything is drawn."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RecordsError(f"--out {path}: the folder {folder} does not exist")


def main_of(body):
    """body() with a RecordsError as one line on stderr and exit status 1."""
    try:
        return body() or 0
    except RecordsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
