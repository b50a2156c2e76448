"""Temporary names of files being written, and their removal.

Every writer of the project writes to `<file>.tmp<pid>` (or `<stem>.tmp<pid><ext>` where the format is chosen by
the extension) in the file's folder and renames it into place when complete, so a reader never sees half a file.
What an interrupted write leaves is removed: by the next run in that folder when the process was killed (its pid
no longer runs), or by the process itself when the interrupt watchdog ends it.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re

logger = logging.getLogger(__name__)

TEMPORARY_MARKER = re.compile(r"\.tmp(?P<pid>\d+)(?:\.[^.]+)?$")  # the `.tmp<pid>` of a name, then an extension


def temporary_path(path: str, keep_extension: bool = False) -> str:
    """Where `path` is written before it is renamed into place: `<path>.tmp<pid>` in the same folder, or
    `<stem>.tmp<pid><ext>` with `keep_extension` (writers that pick the format from the extension)."""
    if keep_extension:
        root, ext = os.path.splitext(path)
        return f"{root}.tmp{os.getpid()}{ext}"
    return f"{path}.tmp{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's live process
        return True
    except (ProcessLookupError, OverflowError):  # no such process, or no possible pid
        return False
    return True


def remove_leftover_temporary_files(folder: str, pattern: str = "*.safetensors.tmp*") -> list[str]:
    """Delete the temporary files in `folder` left by a killed write (their process no longer runs), so a new run
    in that folder starts clean; files of a live process are left alone. Returns the removed paths."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), pattern))):
        match = TEMPORARY_MARKER.search(path)
        if match is None or not os.path.isfile(path) or _process_alive(int(match["pid"])):
            continue
        os.remove(path)
        logger.info(f"removed {path}, left by an interrupted save")
        removed.append(path)
    return removed


def remove_temporary_files(folder: str) -> list[str]:
    """Delete the temporary files this process is writing in `folder` and its sub-folders (what the interrupt
    watchdog does before it ends the process). Returns the removed paths."""
    marker = re.compile(rf"\.tmp{os.getpid()}(?!\d)")
    removed = []
    for root, _, names in os.walk(folder):
        for name in names:
            if marker.search(name):
                path = os.path.join(root, name)
                with contextlib.suppress(FileNotFoundError):  # the writer's own cleanup got there first
                    os.remove(path)
                    removed.append(path)
    return removed
