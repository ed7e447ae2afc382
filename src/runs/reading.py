"""Reading a run folder's JSON files back, checked as they are read: a file that is not what the runner writes
(edited, truncated, copied from another run) raises `UnreadableRun`, one line naming the file, never a stray
traceback. Reading never runs code from a folder.
"""
import json
from pathlib import Path

from src.config import MAX_NESTING, nesting_depth
from src.errors import RunError
from src.runs.names import LOG, STATUS

# Columns of log.jsonl that hold numbers (or null); anything else there means the file is not a log.
LOG_NUMBERS = ("epoch", "iteration", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "epoch_seconds",
               "images_per_second", "finished_at", "ema_valid_loss", "ema_valid_acc")
STATUS_COUNTS = ("epochs_done", "iterations_done", "n_epochs")


class UnreadableRun(RunError, ValueError):
    """A file of a run folder is not what the runner writes; the message names it (exit 1 in the scripts)."""

def parse_json(text, where):
    """The value of the JSON `text`; UnreadableRun naming `where` when it is not JSON or nests absurdly deep."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UnreadableRun(f"{where} is not valid JSON ({str(e)[:100]})") from None
    except RecursionError:  # json gives up a few thousand levels deep
        raise UnreadableRun(f"{where} nests lists or dicts too deeply to read") from None
    if nesting_depth(value) > MAX_NESTING:
        raise UnreadableRun(f"{where} nests lists or dicts more than {MAX_NESTING} deep")
    return value


def read_object(path):
    """The JSON object (a dict) in the file `path`; FileNotFoundError when there is none."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise UnreadableRun(f"{path} is not valid JSON (not UTF-8 text)") from None
    value = parse_json(text, path)
    if not isinstance(value, dict):
        raise UnreadableRun(f"{path} holds a JSON {json_kind(value)}, not an object of key: value")
    return value


def json_kind(value):
    """What JSON calls the type of `value`, as parsed by json.loads."""
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def read_log(path):
    """The per-epoch log of the run in `path` as a DataFrame (empty before the first epoch)."""
    import pandas as pd

    log_file = Path(path) / LOG
    try:
        lines = log_file.read_text().splitlines() if log_file.exists() else []
    except UnicodeDecodeError:
        raise UnreadableRun(f"{log_file} is not a log (not UTF-8 text)") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            rows.append(_log_row(parse_json(line, f"{log_file} line {number}"), f"{log_file} line {number}"))
    return pd.DataFrame(rows)


def _log_row(row, where):
    if not isinstance(row, dict):
        raise UnreadableRun(f"{where} is a JSON {json_kind(row)}, not an object")
    for key in LOG_NUMBERS:
        if row.get(key) is not None and not is_number(row[key]):
            raise UnreadableRun(f"{where}: {key} is {shown(row[key])}, not a number")
    return row


def is_number(value):
    """A float (nan and inf included: a diverged validation may log them), or an int that fits 64 bits."""
    if isinstance(value, bool):
        return False
    return isinstance(value, float) or (isinstance(value, int) and -2**63 <= value < 2**63)


def shown(value):
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def read_status(path):
    """status.json of the run in `path`, its counts checked; None when there is none. The one reader of the
    file: the loop's resume (src.runs.folder) and the notebooks' (src.analysis) both go through it."""
    status_file = Path(path) / STATUS
    if not status_file.exists():
        return None
    status = read_object(status_file)
    for key in STATUS_COUNTS:
        value = status.get(key)
        if value is not None and not (is_number(value) and isinstance(value, int) and 0 <= value):
            raise UnreadableRun(f"{status_file}: {key} is {shown(value)}, not a count")
    return status
