"""What every command line of the project shares: one parser style, one error style, logging, --debug.

- Flag errors: one line `error: <message>; see <prog> --help.`, exit status 2 (argparse's convention).
- User errors (`vitnt_jax.errors.UserError` and the exceptions a command names): one line
  `error: <sentence>`, exit status 1, with every setting named by its flag (`batch_size` ->
  `--batch-size`); `--debug` or VITNT_JAX_DEBUG=1 prints the traceback first.
- Progress and warnings: the library logs to the `vitnt_jax` loggers; `configure_logging` prints
  INFO lines as they are and warnings as `warning: <message>` on stderr.

Nothing here imports JAX, so `--help` and flag errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable

from vitnt_jax.errors import UserError

DEBUG_ENV = "VITNT_JAX_DEBUG"


class Parser(argparse.ArgumentParser):
    """An argument parser whose flag errors are one line (no usage dump), exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help.\n")


def flag(name: str) -> str:
    """Returns the flag of a setting: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Adds `--debug` (print the traceback of an error, as VITNT_JAX_DEBUG=1 does)."""
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")


class _StderrHandler(logging.Handler):
    """Writes to the sys.stderr of the moment (so redirections made after set-up are honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            prefix = "warning: " if record.levelno == logging.WARNING else ""
            prefix = "error: " if record.levelno >= logging.ERROR else prefix
            sys.stderr.write(prefix + text + "\n")
            sys.stderr.flush()
        except Exception:  # logging must never stop a run
            self.handleError(record)


_HANDLER = _StderrHandler()


def configure_logging(level: int = logging.INFO) -> None:
    """Prints the library's progress (INFO) and warnings on stderr, once however often it is called."""
    for name in ("vitnt_jax", "experiments"):
        logger = logging.getLogger(name)
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)
        logger.setLevel(level)
        logger.propagate = False  # a handler of the root logger (basicConfig, absl) would print each line twice


def debug_wanted(flag_given: bool = False) -> bool:
    """Returns whether tracebacks are wanted: `--debug` given or VITNT_JAX_DEBUG set (not 0)."""
    return flag_given or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def printable(text: str) -> str:
    """Returns `text` with every character that is not printable (ESC, CR, a line break, a lone surrogate, ...)
    written as its Python escape, so that no message moves the cursor, clears the terminal or spans lines.

    Printable text stays as it is, non-ASCII included (accents, CJK).
    """
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def run_command(
    body: Callable[[], int],
    *,
    debug: bool = False,
    errors: tuple[type[BaseException], ...] = (),
    names: Callable[[str], str] = flag,
    interrupted: str | None = None,
    terminate: bool = True,
) -> int:
    """Runs a command's body; returns its exit status, or 1 after printing a user error as one line.

    errors: further exception types that are user errors (their str is the sentence).
    interrupted: the line printed on Ctrl-C (exit status 130) and on SIGTERM (143, e.g. a batch scheduler
      stopping the job: the body's cleanup runs as for Ctrl-C); None lets KeyboardInterrupt through.
    terminate: False leaves SIGTERM as it is (a supervised worker, whose supervisor reports the signal).
    """
    configure_logging()
    debug = debug_wanted(debug)
    previous = None
    if terminate and interrupted is not None and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return body()
    except (UserError, *errors) as error:
        if debug:
            traceback.print_exc()
        text = error.render(names) if isinstance(error, UserError) else str(error)
        print(f"error: {printable(text)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        if interrupted is None:
            raise
        print(interrupted, file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(stop, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread so the command stops as it does on Ctrl-C."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()
