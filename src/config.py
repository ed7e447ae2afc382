"""Named configs and `--key=value` overrides typed by the root config.

A config is a flat dict. Every named config derives from `root`, so the root's value types are
the schema: an override or a JSON config must give each key a value of the root's type.
"""
import copy
import difflib
import json
import math
from pathlib import Path

from src.errors import UsageError

TRUE_WORDS = {"true", "yes", "1"}
FALSE_WORDS = {"false", "no", "0"}
# Lists and dicts in a config nest this deep at most: far beyond any real value, and well inside what
# json (and the indented writer of config.json, which recurses twice per level) can handle.
MAX_NESTING = 32


class ConfigRegistry:
    """One model family's named configs: name -> config dict; `set_root` fixes the keys and their types.

    `model` is the family's name (the `model` key its configs record, and its builder's name in
    src.models.MODELS); `validate(config)` returns the problems a type alone cannot catch; `runner`
    is the script that trains the family (what sweeps start).
    """

    def __init__(self, model="simple_cnn", validate=None, runner=None):
        self.model, self.runner = model, runner
        self._validate = validate or (lambda config: [])
        self._configs = {}

    def set_root(self, config):
        self._configs["root"] = copy.deepcopy(config)

    @property
    def root(self):
        return copy.deepcopy(self._configs["root"])

    def problems(self, config):
        return self._validate(config)

    def check(self, config):
        """`config` if it is valid; else a UsageError listing every problem (before anything is written)."""
        problems = self.problems(config)
        if problems:
            raise UsageError("; ".join(problems))
        return config

    def complete(self, saved, where="config.json"):
        """-> (`saved` with the keys the root gained since it was written, at their root values; those keys).

        New keys default to the behaviour before they existed, so this is the same run. A saved key
        the root no longer has is a UsageError naming it: its effect could not be reproduced.
        """
        root = self._configs["root"]
        unknown = [key for key in saved if key not in root]
        if unknown:
            raise UsageError(f"{where} has {'keys' if len(unknown) > 1 else 'a key'} this code no longer knows "
                             f"({', '.join(map(clip, unknown))}); resume it with the code that wrote it")
        filled = [key for key in root if key not in saved]
        return {**{key: copy.deepcopy(root[key]) for key in filled}, **saved}, filled

    def derive(self, name, **changes):
        """Register `name` as the root with `changes`; their keys and types are checked here too."""
        config = self.root
        for key, value in changes.items():
            check_known_key(key, config, where=f"config '{name}': ")
            config[key] = check_value(key, value, config)
        self._configs[name] = config

    def names(self):
        return sorted(self._configs)

    def get(self, name_or_path):
        """A registered name, or a path to a `.json` config (missing keys take the root's values)."""
        if name_or_path.endswith(".json"):
            return self._load_json(Path(name_or_path))
        if name_or_path not in self._configs:
            raise UsageError(
                f"unknown config '{name_or_path}'; available: {', '.join(self.names())} "
                "(or a path to a .json config)"
            )
        return copy.deepcopy(self._configs[name_or_path])

    def _load_json(self, path):
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"config file {path} does not exist") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"config file {path} is not valid JSON: {e}") from None
        except RecursionError:  # json gives up on nesting a few thousand deep
            raise UsageError(f"config file {path} nests lists or dicts too deeply to read") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"config file {path} must hold a JSON object of key: value")
        config = self.root
        for key, value in loaded.items():
            check_known_key(key, config, where=f"in {path}: ")
            config[key] = check_value(key, value, config)
        return config


def check_known_key(key, config, where=""):
    if key not in config:
        close = difflib.get_close_matches(key, list(config), n=1)
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the keys"
        raise UsageError(f"{where}unknown config key '{clip(key)}'{hint}")


def type_name(value):
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list (JSON)", dict: "dict (JSON)"}[
        type(value)
    ]


def check_value(key, value, config):
    """`value` if it has the root's type for `key` (an int is accepted for a float)."""
    expected = type(config[key])
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected:
        raise UsageError(f"bad value {_short(value)} for --{key}: expected {type_name(config[key])}")
    if expected in (list, dict) and nesting_depth(value) > MAX_NESTING:
        raise UsageError(f"bad value for --{key}: lists or dicts nested more than {MAX_NESTING} deep")
    if not finite(value):
        raise UsageError(f"bad value {_short(value)} for --{key}: numbers must be finite, not inf or nan")
    return value


def finite(value):
    """False if `value` is, or holds in its lists and dicts, an inf or nan float: no key means anything by one
    (`--lr_decay=inf` even saved a folder that could never resume)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, (list, dict)):
            stack.extend(item.values() if isinstance(item, dict) else item)
    return True


def nesting_depth(value):
    """How deep lists and dicts nest in `value` (a scalar is 0); without recursion, so any depth is safe."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _short(value, limit=60):
    """repr(value) cut to `limit` characters: a huge or deeply nested value still gives a short line."""
    if nesting_depth(value) > MAX_NESTING:  # repr itself would recurse too deeply
        return f"(a {type(value).__name__} nested more than {MAX_NESTING} deep)"
    return clip(repr(value), limit)


def clip(text, limit=60):
    return text if len(text) <= limit else text[:limit] + "..."


def parse_value(key, text, config):
    """Turn the text of `--key=text` into a value of the root's type for `key`."""
    expected = type(config[key])
    shown = clip(text)
    bad = UsageError(f"bad value '{shown}' for --{key}: expected {type_name(config[key])}")
    if expected is bool:
        word = text.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise UsageError(f"bad value '{shown}' for --{key}: expected bool (true/false/yes/no/1/0)")
    if expected in (int, float):
        try:
            value = expected(text)
        except ValueError:
            raise bad from None
        return check_value(key, value, config)  # inf and nan parse as floats: refused there
    if expected is str:
        return text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested thousands deep
        raise bad from None
    return check_value(key, value, config)


def apply_overrides(config, overrides):
    """`overrides`: key -> text from the command line."""
    config = copy.deepcopy(config)
    for key, text in overrides.items():
        check_known_key(key, config)
        config[key] = parse_value(key, text, config)
    return config


def diff_keys(old, new):
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


# Every model family's registry by its name (a leaf: configs/<family>.py registers itself here; `configs.family`
# and `configs.find_config` look it up once the package has imported every built-in family).
FAMILIES = {}
LEGACY_MODEL = "simple_cnn"  # what a config.json without a `model` key was: the only family then


def register_family(registry):
    """Make a family's registry known to sweeps, `load_main_loop`, `evaluate.py` and `report.py`."""
    FAMILIES[registry.model] = registry
    return registry
