"""Command-line plumbing shared by the scripts: config overrides through argh, and exit codes.

Exit codes: 0 done; 2 bad usage or config; 1 a runtime failure or refusal; 128 + N after signal N.
User errors print one line on stderr, never a traceback. So does a Ctrl-C that reaches `user_errors`
as a KeyboardInterrupt (the scripts exit at once on SIGINT by themselves; this covers other callers):
exit 130, as after any SIGINT.
"""
import argparse
import contextlib
import functools
import json
import sys

import argh

from src.config import apply_overrides, check_known_key, type_name
from src.errors import RunError, UsageError


INTERRUPTED = "SIGINT: exiting now"  # what the runner says when Ctrl-C comes before its loop


class OneLineErrorParser(argh.ArghParser):
    """argparse prints usage plus the error; we print the error and where to look."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def user_errors():
    """Turn our errors into one line on stderr and exit code 2 (usage) or 1 (runtime)."""
    try:
        yield
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a file-system problem the code did not foresee: still one line, naming the file
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # nothing of ours was in progress: the main loop handles SIGINT itself
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)


def exit_codes(main):
    """Run `main` under `user_errors` and exit with the code it returns."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        with user_errors():
            code = main(*args, **kwargs)
        sys.exit(code or 0)

    return wrapped


def dispatch(function, argv=None, description=None):
    """argh spells `allow_unfinished` as --allow-unfinished; accept --allow_unfinished too, like the config keys."""
    argv = sys.argv[1:] if argv is None else argv
    argv = [w.split("=", 1)[0].replace("_", "-") + w[len(w.split("=", 1)[0]):] if w.startswith("--") else w
            for w in argv]
    parser = OneLineErrorParser(description=description)
    argh.set_default_command(parser, function)
    with user_errors():  # a Ctrl-C while argh parses, before `function` runs
        argh.dispatch(parser, argv=argv)


def dispatch_with_overrides(run, registry, argv=None, description=None):
    """Parse `CONFIG SAVE_PATH [--key=value ...]` and call `run(config, save_path)` with the resolved config.

    Every root key becomes an option, so `--help` lists them with their defaults; the values are
    parsed by the root's types (src.config), not by argparse, to give one clear line per mistake.
    """
    argv = sys.argv[1:] if argv is None else argv
    root = registry.root

    @exit_codes
    def command(config, save_path, **overrides):
        """CONFIG is a registered name or a .json file; SAVE_PATH is the run folder (rerun to resume)."""
        chosen = {key: text for key, text in overrides.items() if text is not None}
        resolved = registry.check(apply_overrides(registry.get(config), chosen))  # before anything is written
        return run(resolved, save_path)

    command = argh.arg("config", help=f"one of {', '.join(registry.names())}, or a path to a .json config")(command)
    command = argh.arg("save_path", help="the run folder; rerunning the same command resumes")(command)
    parser = OneLineErrorParser(description=description, formatter_class=argparse.HelpFormatter)
    overrides = parser.add_argument_group("config keys (--key=value overrides the config's value)")
    for key, value in root.items():  # added here, not by argh.arg, which would turn _ into -
        overrides.add_argument(f"--{key}", default=None, metavar=type_name(value).split()[0].upper(),
                               help=f"default: {json.dumps(value)}")
    argh.set_default_command(parser, command)
    with user_errors():
        for word in argv:  # before argparse, which would accept abbreviations and give no hint
            if word.startswith("--") and word not in ("--help", "--"):
                check_known_key(word[2:].split("=", 1)[0], root)
        argh.dispatch(parser, argv=argv)
