"""What every entry script shares: the argparse pieces and the one path by which errors reach the user.

A mistake in what the user gave (a flag, a file, a prompt line) is a `UserError`: the script prints it as a single
`error: <message>` line and exits with status 2, without a traceback. Ctrl-C prints `interrupted` and exits with 130.
Any other exception is a bug and keeps its traceback. `--debug` (or FPACK_DEBUG=1 in the environment) shows the
traceback of user errors and interruptions too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "FPACK_DEBUG"
# How long a Ctrl-C may take to end a script on its own before the interrupt watchdog ends it: the usual path (the
# KeyboardInterrupt unwinding, removing half-written files, the last log lines) takes well under a second.
INTERRUPT_GRACE_S = 2.0


class UserError(Exception):
    """Base class of every error that reports a mistake in the user's input: printed as one line, exit status 2."""


class UsageError(UserError, ValueError):
    """A flag value, or a combination of flags, that cannot work."""


class MissingPackageError(UserError, ImportError):
    """A flag asks for an optional package that is not installed; the message names the flag and the package."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help shows its default; descriptions and epilogs keep their line breaks."""


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors (unknown flag, bad value, `parser.error(...)`) are one `error:` line and exit
    status 2 like every other input error, instead of argparse's usage block."""

    def error(self, message: str):
        report_error(f"{message} (run {self.prog} --help for the flags)")
        raise SystemExit(EXIT_BAD_INPUT)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"on an input error or Ctrl-C also print the Python traceback (same as {DEBUG_ENV}=1 in the environment)",
    )


def check_positive(flag: str, value, allow_zero: bool = False) -> None:
    """Raise UsageError naming `flag` unless `value` is None or > 0 (>= 0 with `allow_zero`)."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_finite(flag: str, value, minimum: float | None = None, below: float | None = None) -> None:
    """Raise UsageError naming `flag` unless `value` is None or a finite number >= `minimum` and < `below`."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value}")
    if below is not None and value >= below:
        raise UsageError(f"{flag} must be below {below}, got {value}")


def _folder_problem(folder: str) -> str | None:
    """Why `folder` cannot be used as an output folder (without creating it), or None."""
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            return "exists and is not a folder"
        return None if os.access(folder, os.W_OK | os.X_OK) else "the folder is not writable"
    parent = os.path.dirname(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created, {parent} is a file"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot be created, {parent} is not writable"


def check_output_folder(flag: str, path: str) -> None:
    """Refuse an output folder that cannot be created or written to, without creating it."""
    problem = _folder_problem(os.path.abspath(path))
    if problem:
        raise UsageError(f"{flag} {path}: {problem}")


def check_output_file(flag: str, path: str) -> None:
    """Refuse an output file path that is a folder or whose folder cannot be created or written to."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: cannot be written, {folder} is a file")
    problem = _folder_problem(folder)
    if problem:
        raise UsageError(f"{flag} {path}: its folder {problem}")


@contextlib.contextmanager
def log_level(log: logging.Logger, level: int):
    """`log` shows only records of `level` and above inside the block (routine messages of a repeated step)."""
    previous = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(previous)


def one_line(message: object) -> str:
    """A message on a single line: its line breaks become '; '."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def report_error(error: object) -> None:
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)


_interruption_reported = threading.Lock()


def report_interrupted() -> None:
    """Print the `interrupted` line, once per process: the main thread and the interrupt watchdog may both end it."""
    if _interruption_reported.acquire(blocking=False):
        print("interrupted", file=sys.stderr, flush=True)


def debug_requested(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in args


def entry_point(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a script's `main(argv) -> exit status`: a UserError becomes one `error:` line and SystemExit(2), Ctrl-C
    becomes `interrupted` and SystemExit(130); the exit status of a normal return is passed through."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as e:
            if debug_requested(argv):
                traceback.print_exc()
            report_error(e)
            raise SystemExit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            if debug_requested(argv):
                traceback.print_exc()
            report_interrupted()
            raise SystemExit(EXIT_INTERRUPTED) from None

    return run


class InterruptWatchdog:
    """Ends the process when a Ctrl-C has not ended it within `grace_s` seconds.

    Python turns SIGINT into a KeyboardInterrupt only when the main thread next runs Python code, and a
    KeyboardInterrupt raised inside a finalizer or a library callback is printed as "Exception ignored in ..." and
    dropped, after which the program runs on. The signal is also written to a pipe (signal.set_wakeup_fd) that a
    thread waits on, so the watchdog sees it at once whatever the main thread is doing; when the grace runs out it
    calls the registered cleanups (e.g. removing this process's temporary files), prints `interrupted` and exits
    with status 130. `armed` False (an interactive prompt that treats Ctrl-C as "skip this prompt") lets a Ctrl-C
    pass without ending the process."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.armed = True
        self.cleanups: list[Callable[[], None]] = []
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True, name="interrupt-watchdog").start()

    def _watch(self, read_fd: int) -> None:
        while True:
            if signal.SIGINT in os.read(read_fd, 64) and self.armed:
                time.sleep(self.grace_s)
                if self.armed:
                    break
        for cleanup in self.cleanups:
            try:
                cleanup()
            except Exception:  # a cleanup that fails must not keep the process running
                pass
        report_interrupted()
        os._exit(EXIT_INTERRUPTED)


interrupt_watchdog: InterruptWatchdog | None = None


def on_forced_interrupt(cleanup: Callable[[], None]) -> None:
    """Run `cleanup` when the interrupt watchdog ends the process (nothing happens without a watchdog)."""
    if interrupt_watchdog is not None:
        interrupt_watchdog.cleanups.append(cleanup)


def set_interrupt_watchdog_armed(armed: bool) -> None:
    if interrupt_watchdog is not None:
        interrupt_watchdog.armed = armed


def script_main(main: Callable[[], int], interrupt_grace_s: float | None = None) -> Callable[[], int]:
    """The `main` of an entry script (and of its console command): runs `main()` and returns its status.

    An input error (2) or an interruption (130) leaves through os._exit once the output is flushed: the
    interpreter's teardown of torch and transformers takes seconds, and a Ctrl-C should stop the script at once.
    With `interrupt_grace_s` an InterruptWatchdog ends a run that a Ctrl-C did not end within that many seconds; it
    needs the main thread (signal.set_wakeup_fd), which every process of `accelerate launch` runs its script in.
    A second Ctrl-C that arrives while the first is being reported (`accelerate launch` forwards the terminal's
    SIGINT to processes that got it already) ends the script the same way."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        global interrupt_watchdog
        on_main_thread = threading.current_thread() is threading.main_thread()
        if interrupt_grace_s is not None and interrupt_watchdog is None and on_main_thread:
            interrupt_watchdog = InterruptWatchdog(interrupt_grace_s)
        try:
            return main() if argv is None else main(argv)
        except SystemExit as e:
            if e.code in (EXIT_BAD_INPUT, EXIT_INTERRUPTED):
                _exit_now(e.code)
            raise
        except KeyboardInterrupt:
            report_interrupted()
            _exit_now(EXIT_INTERRUPTED)

    return run


def _exit_now(status: int) -> None:
    """Flush the output and end the process without the interpreter's teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
