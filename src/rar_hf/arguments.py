r"""The command line shared by `rar-hf`, `python -m rar_hf.<module>` and the examples/ scripts: argument types, the
parser, user errors and how a command runs.

One rule for how every command and script ends:

- exit status 0: it did what was asked;
- exit status 2: the input was refused: a flag argparse rejects, or a mistake found later in a flag, file or folder
  (`UserError`, and the `ValueError`, `KeyError` and `OSError` that the libraries raise for bad input, e.g. an unknown
  class name or a missing file). stderr ends with ONE line, `PROG: error: what was wrong and what is expected`, and
  no traceback (set RAR_HF_TRACEBACK=1 to see it);
- exit status 1: anything else (a bug, a crash): Python's traceback.

A command module has `add_arguments(parser)` and `main(args)`; `command_parser(module)` builds its parser and
`run_script(module.main, args)` runs it under that rule.
"""

import argparse
import contextlib
import math
import os
import sys
import tempfile
from pathlib import Path

# The errors that mean "the input was refused" (see the module docstring); anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ValueError, KeyError, OSError)
USAGE_ERROR_STATUS = 2
TRACEBACK_ENV = "RAR_HF_TRACEBACK"
HUB_OFFLINE_HINT = "offline: set HF_HUB_OFFLINE=0 or pass a local folder"


class UserError(ValueError):
    """A mistake in what the user asked for (a flag, a file, a folder): reported as one line, never a traceback."""


# ---- argument types ----


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or infinite (NaN guidance would silently give black images)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ---- the parser ----


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions shown as written (shell continuations survive) and every flag's default in its help, unless the
    help already states it or there is none to state (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default is argparse.SUPPRESS
        if nothing or "default" in text.lower() or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error, `prog: error: message (see prog --help)`, descriptions shown as written and
    the defaults in the help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(USAGE_ERROR_STATUS, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_parser(module, prog: str | None = None) -> ArgumentParser:
    """The parser of a command module (its docstring as description, its `add_arguments`)."""
    parser = ArgumentParser(prog=prog, description=module.__doc__)
    module.add_arguments(parser)
    return parser


# ---- running a command ----


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (a KeyError's message without the quotes str() adds)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return text or type(error).__name__


@contextlib.contextmanager
def user_errors(prog: str | None = None):
    """Turn a user error raised inside the block into `prog: error: ...` on stderr and exit status 2."""
    try:
        yield
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
            raise
        prog = prog or Path(sys.argv[0]).name or "rar-hf"
        # Under `accelerate launch` every process reports: the rank says which one.
        rank = os.environ.get("RANK")
        where = f" [rank {rank}]" if rank not in (None, "0") else ""
        print(f"{prog}{where}: error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR_STATUS)


def run_script(main, args, prog: str | None = None):
    """Run `main(args)` (a command's or a script's) under the exit-status rule of this module; returns its result."""
    with user_errors(prog):
        return main(args)


# ---- paths, checked before any compute ----


def check_writable(path, flag: str, folder: bool = False) -> None:
    """Raise a `UserError` unless `path` can be written: a file (`folder=False`) or a folder that may not exist yet.

    Checked without creating anything: the nearest existing ancestor must be a folder in which a file can be created
    (tried with a temporary file, which also catches read-only file systems and works for root).
    """
    path = Path(path)
    expected = "a folder" if folder else "a file path"
    if path.exists():
        if folder and not path.is_dir():
            raise UserError(f"{flag} {path} is a file, expected a folder")
        if not folder and path.is_dir():
            raise UserError(f"{flag} {path} is a folder, expected a file path")
        if not folder and not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path}: the file is not writable")
    ancestor = path if folder and path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, so {path} cannot be created ({expected} was expected)")
    try:
        with tempfile.TemporaryFile(dir=ancestor, prefix=".rar-hf-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(f"{flag} {path}: cannot write in {ancestor} ({reason})") from None
