"""What every command-line entry point shares: a user's mistake ends in one line, not a traceback.

    def main(argv=None):
        return run_cli(_main, argv)

A user error (a bad flag value, a missing or bad file or directory, a bad dataset, ...) is printed as
`error: <what and where>` on stderr and the process exits with status 2; `--debug` anywhere on the command line shows
the traceback instead. Library code raises ordinary exceptions (ValueError, FileNotFoundError, ...) whose message
names the file, line, language or key at fault; only the entry points turn them into this one line.

`load_pretrained(loader, name_or_path, ...)` loads a model, processor or tokenizer from a local directory or the Hub,
and reports a missing local directory as that path, not as a failed connection to the Hub (`check_local_path` is that
check alone).
"""
import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from datasets.exceptions import DatasetGenerationError
from safetensors import SafetensorError, safe_open

# exceptions that report a user's input; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               KeyError)


class UsageError(ValueError):
    """A bad command line, as argparse (or HfArgumentParser) words it."""


@contextlib.contextmanager
def _parser_errors_raise():
    """argparse prints the whole usage and exits on a bad flag; while an entry point runs, `ArgumentParser.error`
    raises a UsageError instead, so that a bad flag is reported on one line like any other user error. (A patch,
    because the entry points build their own parsers: argparse or transformers' HfArgumentParser.)"""
    original = argparse.ArgumentParser.error

    def error(parser, message):
        raise UsageError(f"{message} (see {parser.prog} --help)")

    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def user_error(error):
    """The user error that `error` reports, or None for a bug. datasets wraps what a builder raises while it
    generates rows (a bad image, a missing image id) in a DatasetGenerationError: its cause is the user error."""
    if isinstance(error, USER_ERRORS):
        return error
    if isinstance(error, DatasetGenerationError) and isinstance(error.__cause__, USER_ERRORS):
        return error.__cause__
    return None


def run_cli(main, argv=None):
    """Call `main(argv)` (argv: the arguments without the program name; default `sys.argv[1:]`), reporting user
    errors on one line with exit status 2 unless `--debug` is among the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        with _parser_errors_raise():
            return main(argv)
    except Exception as error:
        reported = user_error(error)
        if debug or reported is None:
            raise
        message = reported.args[0] if isinstance(reported, KeyError) and reported.args else reported
        logging.getLogger(__name__).debug("user error", exc_info=True)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def looks_local(name_or_path):
    """Whether a name can only be a local path: a Hub id is `name` or `owner/name`, never absolute, never `.`/`..`/`~`
    first, never with more than one separator."""
    text = os.fspath(name_or_path)
    return (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text)


def check_local_path(name_or_path, what="model"):
    """`name_or_path` as a string when it is a local directory or can be a Hub id; a path that names a file, or a
    missing directory that cannot be a Hub id, raises an error that names the path."""
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{what} {os.path.abspath(path)} is a file, not a directory")
    if looks_local(name_or_path):
        raise FileNotFoundError(f"{what} directory {os.path.abspath(path)} not found")
    return os.fspath(name_or_path)


def load_pretrained(loader, name_or_path, *args, what="model", **kwargs):
    """`loader(name_or_path, *args, **kwargs)` (e.g. `AutoModel.from_pretrained`) for a local directory or a Hub id.

    A missing local directory raises FileNotFoundError naming it, without asking the Hub; a name that can be a Hub id
    but is neither here nor loadable from the Hub raises FileNotFoundError naming both places; a corrupt safetensors
    file raises ValueError naming the file.
    """
    name = check_local_path(name_or_path, what)
    local = os.path.isdir(name)
    try:
        return loader(name, *args, **kwargs)
    except SafetensorError as error:
        corrupt = [path for path in Path(name).rglob("*.safetensors") if _safetensors_problem(path)] if local else []
        raise ValueError(f"{', '.join(map(str, corrupt)) or name}: not a valid safetensors file ({error})") from error
    except OSError as error:  # transformers reports a missing or unreachable Hub repo, or a missing file, as OSError
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if local:
            raise FileNotFoundError(f"{what} {os.path.abspath(name)}: {reason}") from error
        raise FileNotFoundError(f"{what} {name!r}: no directory {os.path.abspath(name)} here, and not loadable from "
                                f"the Hub ({reason})") from error


def _safetensors_problem(path):
    try:
        with safe_open(path, framework="pt") as weights:
            for key in weights.keys():
                weights.get_slice(key)
    except SafetensorError as error:
        return str(error)
    return None

