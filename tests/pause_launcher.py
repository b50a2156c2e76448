"""Run an entry script with one function held up, so a test can send a real Ctrl-C in a chosen phase.

    python tests/pause_launcher.py MODULE:FUNCTION [--match REGEX] [--call N] [--swallow] -- SCRIPT ARGS...

The N-th call of FUNCTION (counting only calls whose arguments' repr matches REGEX) prints `PAUSED <target>` to
stderr and sleeps before running the function; the test sends SIGINT when it sees the line. Tiny test models load
and save in milliseconds, so a signal sent on a log line would land in whatever phase comes next; held up here,
the phase is the one named. `os:replace` with a REGEX on the temporary name holds a save at the moment its
temporary file is complete and not yet renamed. With `--swallow` the pause catches the KeyboardInterrupt and goes
on sleeping, as a library that prints "Exception ignored in ..." does; only the interrupt watchdog can end that.

FUNCTION is replaced on its module (or class, `module:Class.method`) before SCRIPT runs, so a consumer that
imports it by name (`from module import function`) afterwards gets the held-up one. SCRIPT then runs as
`__main__` with ARGS as its argv, as `python SCRIPT ARGS...` would run it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "PAUSED"
HOLD_S = 120.0  # long enough for any test to send its signal; a pause never ends a test by itself


def hold(target: str, swallow: bool) -> None:
    end, announced = time.monotonic() + HOLD_S, False
    while time.monotonic() < end:
        try:  # the line is printed inside the try: a signal sent on it may arrive before the sleep starts
            if not announced:
                announced = True
                print(f"{MARKER} {target}", file=sys.stderr, flush=True)
            time.sleep(max(0.0, end - time.monotonic()))
        except KeyboardInterrupt:
            if not swallow:
                raise


def hold_up(target: str, match: str | None, call: int, swallow: bool) -> None:
    """Replace `target` (`module:attribute.path`) by a wrapper that holds up its `call`-th matching call."""
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    pattern = re.compile(match) if match else None
    seen = 0

    @functools.wraps(original)
    def held_up(*args, **kwargs):
        nonlocal seen
        if pattern is None or pattern.search(repr((args, kwargs))):
            seen += 1
            if seen == call:
                hold(target, swallow)
        return original(*args, **kwargs)

    setattr(owner, name, held_up)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="pause_launcher.py")
    parser.add_argument("target", help="MODULE:FUNCTION to hold up")
    parser.add_argument("--match", default=None, help="count only calls whose arguments' repr matches this regex")
    parser.add_argument("--call", type=int, default=1, help="hold up the N-th counted call")
    parser.add_argument("--swallow", action="store_true", help="ignore the KeyboardInterrupt while held up")
    args = parser.parse_args(argv[:split])
    script, *script_argv = argv[split + 1 :]
    sys.path[0] = ROOT  # the project's packages, not this folder's modules
    hold_up(args.target, args.match, args.call, args.swallow)
    sys.argv = [script, *script_argv]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
