"""Running a script on bad input as a user would and checking how it refuses: exit status 2, one `error:` line
naming the culprit, no traceback, no model loaded, nothing written.

Each case is its own process running the script file as `__main__` with its own argv, stdout and stderr, and its
exit status is the process's. To keep a few dozen cases cheap on two cores, the processes are forked from one
runner that imported torch and the project's packages once (a cold start spends ~2 s of CPU importing them);
`run_script` starts a cold interpreter, for the cases that need one (signals, a second run).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests import pause_launcher

ROOT = Path(__file__).resolve().parent.parent
PAUSED = pause_launcher.MARKER  # the line a held-up run prints when it reaches the held-up call
POOL = 2  # cases running at a time
TIMEOUT_S = 300

# Reads [[script, argv, stdout file, stderr file], ...] from stdin; forks one child per case (POOL at a time), which
# runs the script as __main__ the way the interpreter would (uncaught exception: traceback, status 1; SystemExit:
# its code); prints the exit statuses as JSON.
_RUNNER = r"""
import json, os, runpy, sys
import torch, convert_lora, training.trainer, pipelines.cache_latents, pipelines.cache_text_encoder_outputs
cases, pool = json.loads(sys.stdin.read()), int(sys.argv[1])

def child(script, argv, out, err):
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

running, status = {}, {}
for index, case in enumerate(cases):
    if len(running) == pool:
        pid, code = os.wait()
        status[running.pop(pid)] = os.waitstatus_to_exitcode(code)
    pid = os.fork()
    if pid == 0:
        child(*case)
    running[pid] = index
while running:
    pid, code = os.wait()
    status[running.pop(pid)] = os.waitstatus_to_exitcode(code)
print(json.dumps([status[i] for i in range(len(cases))]))
"""


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Case:
    script: str
    argv: list
    expected: tuple[str, ...]  # substrings of the error line (the flag, the file, what is wrong)
    output: Path | None = None  # a folder that must hold no file afterwards
    loading_lines: tuple[str, ...] = ()  # log lines that would mean a model started loading
    status: int = 2
    cache_folder: Path | None = None  # a folder that must hold no cache file afterwards (it holds the media)
    result: Outcome | None = field(default=None, repr=False)


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FPACK_DEBUG", None)
    return env


def run_script(script: str, argv: list, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """The script in a fresh interpreter."""
    cmd = [sys.executable, str(ROOT / script), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)


def run_cases(cases: dict[str, Case], logs: Path) -> dict[str, Case]:
    """Every case in its own process (forked from one warm runner); fills in each case's result."""
    logs.mkdir(parents=True, exist_ok=True)
    table = [
        [case.script, [str(a) for a in case.argv], str(logs / f"{name}.out"), str(logs / f"{name}.err")]
        for name, case in cases.items()
    ]
    runner = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(POOL)],
        input=json.dumps(table),
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=TIMEOUT_S,
    )
    assert runner.returncode == 0, runner.stderr[-3000:]
    codes = json.loads(runner.stdout.strip().splitlines()[-1])
    for case, code, (_, _, out, err) in zip(cases.values(), codes, table, strict=True):
        case.result = Outcome(code, Path(out).read_text(), Path(err).read_text())
    return cases


def files_under(folder: Path | None) -> list[str]:
    if folder is None or not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def check_refusal(case: Case) -> None:
    result = case.result
    output = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == case.status, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    for expected in case.expected:
        assert expected in errors[0], errors[0]
    assert "Traceback" not in output, output[-3000:]
    for line in case.loading_lines:
        assert line not in output, f"{line!r} logged before the refusal:\n{output[-3000:]}"
    assert files_under(case.output) == []


def write_text(path: Path, text: str = "this is not a model file\n" * 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def truncated_copy(source: Path, target: Path, keep: float = 0.5) -> Path:
    """`source` cut to a fraction of its length under `target` (a download or save that stopped midway)."""
    data = Path(source).read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: int(len(data) * keep)])
    return target


# ---- Ctrl-C -------------------------------------------------------------------------------------------------------


def interrupt_when(
    cmd: list[str],
    pattern: str,
    env: dict | None = None,
    at_signal: Callable[[], None] | None = None,
    again: str | None = None,
) -> tuple[int, str, float]:
    """Start `cmd`, send SIGINT as soon as a stderr line matches `pattern` (after calling `at_signal`, which can
    look at the disk at that moment), and a second one when a later line matches `again` -> (exit status, stderr,
    seconds from the first signal to the exit)."""
    env = {**_env(), "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    deadline = threading.Timer(TIMEOUT_S, process.kill)  # a run that never ends fails the test instead of hanging
    deadline.start()
    lines, sent = [], None
    try:
        for line in process.stderr:
            lines.append(line)
            if sent is None and re.search(pattern, line):
                if at_signal is not None:
                    at_signal()
                process.send_signal(signal.SIGINT)
                sent = time.monotonic()
            elif sent is not None and again is not None and re.search(again, line):
                process.send_signal(signal.SIGINT)
                again = None
        code = process.wait(timeout=TIMEOUT_S)
    finally:
        deadline.cancel()
        process.kill()
    assert sent is not None, "".join(lines)[-3000:]
    return code, "".join(lines), time.monotonic() - sent


def assert_interrupted(code: int, stderr: str, seconds: float) -> None:
    """Exit 130, `interrupted` once and as the last line, no traceback, no dropped exception, quickly."""
    assert code == 130, stderr[-3000:]
    lines = stderr.splitlines()
    assert lines[-1] == "interrupted" and lines.count("interrupted") == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    assert not any(line.startswith("error:") for line in lines), stderr[-3000:]
    assert seconds < 10, seconds  # about a second on an idle machine: the exit skips the interpreter teardown


def held_up(cmd: list[str], target: str, match: str | None = None, call: int = 1, swallow: bool = False) -> list:
    """`cmd` (`[python, script, *argv]`) run by tests/pause_launcher.py with `target` held up at its `call`-th
    call (of those whose arguments match `match`); its `PAUSED` line is where to send the signal."""
    python, script, *argv = map(str, cmd)
    options = [*([f"--match={match}"] if match else []), f"--call={call}", *(["--swallow"] if swallow else [])]
    return [python, pause_launcher.__file__, target, *options, "--", script, *argv]


def leftovers(folder: Path) -> list[str]:
    """What an interrupted save may leave under `folder`: `*.tmp<pid>` files and `*-state.tmp` folders."""
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)
