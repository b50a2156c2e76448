"""The temporary names writers use and the two ways their files are removed: this process's own (what the
interrupt watchdog removes before it ends the process) and those of processes that no longer run (what the next
run in a folder removes)."""

import os
import subprocess
import sys

from utils.temporary_files import remove_leftover_temporary_files, remove_temporary_files, temporary_path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def touch(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half")
    return path.name


def test_temporary_names_carry_the_pid_before_or_after_the_extension(tmp_path):
    pid = os.getpid()
    assert temporary_path(str(tmp_path / "a.safetensors")) == str(tmp_path / f"a.safetensors.tmp{pid}")
    assert temporary_path(str(tmp_path / "v.mp4"), keep_extension=True) == str(tmp_path / f"v.tmp{pid}.mp4")


def test_a_process_removes_only_its_own_temporary_files_in_every_sub_folder(tmp_path):
    own = [
        temporary_path(str(tmp_path / "lora.safetensors")),
        temporary_path(str(tmp_path / "sample" / "clip.mp4"), keep_extension=True),
    ]
    for path in own:
        touch(tmp_path / path)
    kept = [
        touch(tmp_path / f"lora.safetensors.tmp{os.getpid()}7"),  # another pid that starts with this one's digits
        touch(tmp_path / f"other.safetensors.tmp{dead_pid()}"),
        touch(tmp_path / "lora-step00000001.safetensors"),
    ]
    assert sorted(remove_temporary_files(str(tmp_path))) == sorted(own)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


def test_the_next_run_removes_the_files_of_dead_processes_only(tmp_path):
    dead = touch(tmp_path / f"x.safetensors.tmp{dead_pid()}")
    live = touch(tmp_path / f"y.safetensors.tmp{os.getpid()}")
    assert remove_leftover_temporary_files(str(tmp_path)) == [str(tmp_path / dead)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live]
