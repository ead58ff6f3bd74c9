"""What every command-line entry point shares: a user's mistake ends in one line, not a traceback.

    def main(argv=None):
        return run_cli(_main, argv)

A user error (a bad flag value, a missing or bad file or directory, a bad dataset, ...) is printed as
`error: <what and where>` on stderr and the process exits with status 2; `--debug` anywhere on the command line shows
the traceback instead. Library code raises ordinary exceptions (ValueError, FileNotFoundError, ...) whose message
names the file, line, language or key at fault; only the entry points turn them into this one line.
"""
import logging
import sys

# exceptions that report a user's input; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               KeyError)


def run_cli(main, argv=None):
    """Call `main(argv)` (argv: the arguments without the program name; default `sys.argv[1:]`), reporting user
    errors on one line with exit status 2 unless `--debug` is among the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        return main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        logging.getLogger(__name__).debug("user error", exc_info=True)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
