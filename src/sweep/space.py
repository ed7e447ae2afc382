"""A search's space from the command line, in the sweep's style, checked before anything is written:

    --key=a,b,c        a choice, each value typed by the root config (as in sweep.py)
    --key=lo:hi        uniform: integers for an int key, floats for a float key
    --key=int:lo:hi    uniform integers, whatever the key's type
    --key=log:lo:hi    log-uniform (integers for an int key)
    --key=value        a fixed override, as in sweep.py

Each dimension draws its value from an Optuna trial (`Dimension.suggest`); choices are drawn as their texts, so
a JSON list is a choice like any other.
"""
import itertools
import re
from dataclasses import dataclass

from src.config import check_known_key, clip, parse_value, type_name
from src.errors import UsageError

RANGE = re.compile(r"^(?:(int|log):)?([^:]+):([^:]+)$")
NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
# The budget and what a trial is: the pruner's rungs are epochs of n_epochs, and a trial owns its folder and device.
NOT_SEARCHED = ("n_epochs", "device", "num_threads", "data_dir")
MAX_CORNERS = 256  # corner points checked against the family's rules before the search starts


@dataclass(frozen=True)
class Dimension:
    key: str
    text: str  # as given on the command line
    kind: str  # "choice" | "int" | "float"
    choices: tuple = ()  # texts, for a choice
    low: float = 0
    high: float = 0
    log: bool = False

    def suggest(self, trial, root):
        """This dimension's value for an Optuna trial, typed as the root config types `key`."""
        if self.kind == "choice":
            return parse_value(self.key, trial.suggest_categorical(self.key, list(self.choices)), root)
        if self.kind == "int":
            return _typed(self.key, trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log), root)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def corners(self, root):
        """The values at its ends (every choice), for checking the space before it is searched."""
        if self.kind == "choice":
            return [parse_value(self.key, text, root) for text in self.choices]
        ends = (int(self.low), int(self.high)) if self.kind == "int" else (self.low, self.high)
        return [_typed(self.key, value, root) for value in ends]


def _typed(key, value, root):
    return float(value) if type(root[key]) is float else value


def parse_space(overrides, root):
    """{key: text} -> ([Dimension, ...], {key: fixed value}); one line (UsageError) for an unknown key or a
    range that does not fit the key's type."""
    dimensions, fixed = [], {}
    for key, text in overrides.items():
        check_known_key(key, root)
        dimension = parse_dimension(key, text, root)
        if dimension is None:
            fixed[key] = parse_value(key, text, root)
            continue
        if key in NOT_SEARCHED:
            raise UsageError(f"--{key} cannot be searched: give it one value (n_epochs is every trial's budget, "
                             "which the pruner cuts short)")
        dimensions.append(dimension)
    if not dimensions:
        raise UsageError("nothing to search: give at least one key a choice (a,b,c) or a range (lo:hi, log:lo:hi, "
                         "int:lo:hi)")
    return dimensions, fixed


def parse_dimension(key, text, root):
    """A Dimension for a choice or a range, None for a fixed value."""
    expected = type(root[key])
    if not text.lstrip().startswith(("[", "{")) and "," in text:
        choices = tuple(part.strip() for part in text.split(","))
        for part in choices:
            parse_value(key, part, root)  # each choice a valid value of the key's type
        if len(set(choices)) != len(choices):
            raise UsageError(f"--{key}={clip(text)}: a choice lists a value twice")
        return Dimension(key, text, "choice", choices=choices)
    match = RANGE.match(text.strip())
    if not match:
        return None
    kind, low, high = match.groups()
    numeric = expected in (int, float)
    if not (kind or (NUMBER.match(low) and NUMBER.match(high))):
        return None  # a string key's value that holds one colon (a path, say)
    if not numeric:
        raise UsageError(f"--{key}={clip(text)}: a range needs a number key, and {key} is a {type_name(root[key])}; "
                         "give its values as a choice: a,b,c")
    integers = kind == "int" or expected is int
    low, high = (_bound(key, text, bound, integers) for bound in (low, high))
    if not low < high:
        raise UsageError(f"--{key}={clip(text)}: the range's low end must be below its high end")
    if kind == "log" and low <= 0:
        raise UsageError(f"--{key}={clip(text)}: a log range needs a low end above 0")
    return Dimension(key, text, "int" if integers else "float", low=low, high=high, log=kind == "log")


def _bound(key, text, bound, integers):
    shown = f"--{key}={clip(text)}"
    if not NUMBER.match(bound):
        raise UsageError(f"{shown}: '{clip(bound)}' is not a number")
    value = float(bound)
    if integers:
        if value != int(value):
            raise UsageError(f"{shown}: {key} takes integers, so the ends must be integers, not {bound.strip()}")
        return int(value)
    return value


def corner_points(dimensions, root):
    """Every combination of the dimensions' ends (at most MAX_CORNERS of them, the first ones)."""
    axes = [[(d.key, value) for value in d.corners(root)] for d in dimensions]
    return [dict(point) for point in itertools.islice(itertools.product(*axes), MAX_CORNERS)]


def check_space(dimensions, fixed, base, problems):
    """Refuse a space whose corners the family's checks refuse (`problems(config)` -> [text]): each sampled point
    is checked again before its trial starts, but a space that is wrong at its ends is a typo."""
    for point in corner_points(dimensions, base):
        found = problems({**base, **fixed, **point})
        if found:
            shown = " ".join(f"--{key}={value}" for key, value in point.items())
            raise UsageError(f"the space holds invalid points, e.g. {clip(shown, 120)}: {'; '.join(found)}")
