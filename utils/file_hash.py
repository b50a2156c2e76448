"""Cheap fingerprints of model files, recorded in output metadata so a re-run can tell whether a file changed.

`quick_hash` ("quick-sha256"): SHA-256 of the file size (8 bytes, little endian) followed by three 1 MiB samples
(the start, the middle and the end; a file of 3 MiB or less is hashed whole). It reads at most 3 MiB whatever the
file size, so a 25 GB checkpoint costs milliseconds; it differs whenever the size, the safetensors header (at the
start) or the sampled weights differ. It is not the full-file SHA-256 that model hubs show. A folder (a snapshot
or shard folder) hashes the sorted list of its weight files' relative names and quick hashes.
"""

from __future__ import annotations

import hashlib
import os

HASH_SCHEME = "quick-sha256"
SAMPLE_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf")


def _file_hash(path: str) -> str:
    size = os.path.getsize(path)
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= 3 * SAMPLE_BYTES:
            digest.update(f.read())
        else:
            for offset in (0, size // 2 - SAMPLE_BYTES // 2, size - SAMPLE_BYTES):
                f.seek(offset)
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def quick_hash(path: str | os.PathLike) -> str:
    """The quick-sha256 of a file, or of a folder's weight files (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return _file_hash(path)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(WEIGHT_SUFFIXES):
                full = os.path.join(root, name)
                digest.update(f"{os.path.relpath(full, path)}\0{_file_hash(full)}\n".encode())
    return digest.hexdigest()
