"""Reading and writing safetensors checkpoints: shard resolution, header inspection, atomic saves.

Every model loader in the project goes through `resolve_weight_files` and `load_state_dict`, so the same rules
(directory, index json, first shard, single file) and the same error messages apply to the DiT, the VAE and the
encoders alike.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from utils.cli import UserError, one_line
from utils.temporary_files import temporary_path

logger = logging.getLogger(__name__)

# `<prefix><index>-of-<count>.safetensors`, e.g. diffusion_pytorch_model-00001-of-00003.safetensors
SHARD_PATTERN = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)-of-(?P<count>\d+)\.safetensors$")

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
}


class WeightFileError(UserError, ValueError):
    """A weight file or folder that cannot be used for what it was given as."""


def _where(flag: str | None) -> str:
    return f"{flag} " if flag else ""


SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    # (first, end) byte positions of the tensor's data in its file, counted from the file start
    data_range: tuple[int, int] | None = field(default=None, compare=False)


def _header_entries(header: object, header_len: int, where: str) -> dict[str, TensorInfo]:
    """The tensor entries of a decoded header, each checked for the fields and types safetensors requires."""
    if not isinstance(header, dict):
        raise WeightFileError(f"{where}: not a safetensors file (its header is not a JSON object)")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise WeightFileError(f"{where}: malformed safetensors header (__metadata__ is not a map of strings)")
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            valid = (
                isinstance(dtype, str)
                and isinstance(shape, list)
                and all(isinstance(n, int) and n >= 0 for n in shape)
                and all(isinstance(n, int) for n in (start, end))
                and 0 <= start <= end
            )
            if valid and dtype in SAFETENSORS_DTYPES:  # data size agrees with shape (other dtypes: not checked)
                valid = end - start == torch.Size(shape).numel() * SAFETENSORS_DTYPES[dtype].itemsize
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise WeightFileError(f"{where}: malformed safetensors header (bad entry for tensor {name!r})")
        infos[name] = TensorInfo(dtype, tuple(shape), (8 + header_len + start, 8 + header_len + end))
    return infos


def read_header(path: str | os.PathLike, flag: str | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read a safetensors header without touching tensor data; refuse truncated, malformed or non-safetensors files
    with a WeightFileError naming `flag` (when given) and the file."""
    path = str(path)
    where = f"{_where(flag)}{path}"
    if os.path.isdir(path):
        raise WeightFileError(f"{where}: is a folder, not a safetensors file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise WeightFileError(f"{where}: file is too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8 or header_len > 100_000_000:
                raise WeightFileError(f"{where}: not a safetensors file (bad header length)")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise WeightFileError(f"{where}: file not found") from e
        reason = "not valid JSON" if isinstance(e, (UnicodeDecodeError, json.JSONDecodeError)) else e
        raise WeightFileError(f"{where}: not a readable safetensors file ({reason})") from e
    infos = _header_entries(header, header_len, where)
    metadata = header.get("__metadata__") or {}
    data_end = max((info.data_range[1] for info in infos.values()), default=8 + header_len)
    if data_end > size:
        raise WeightFileError(
            f"{where}: file is truncated ({size} bytes, header promises {data_end}); download or write it again"
        )
    return infos, metadata


def _shard_family(path: Path, flag: str | None) -> list[str] | None:
    m = SHARD_PATTERN.match(path.name)
    if m is None:
        return None
    width, count = len(m["index"]), int(m["count"])
    files = [path.parent / f"{m['prefix']}{i:0{width}d}-of-{m['count']}.safetensors" for i in range(1, count + 1)]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise WeightFileError(f"{_where(flag)}{path}: shard(s) missing next to it: {', '.join(missing)}")
    return [str(f) for f in files]


def _index_weight_map(index: Path, flag: str | None) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file name) of a shard index json, refused when it is unreadable."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise WeightFileError(f"{_where(flag)}{index}: unreadable shard index ({e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightFileError(f"{_where(flag)}{index}: shard index whose weight_map is not a map of file names")
    return weight_map


def resolve_weight_files(path: str | os.PathLike, flag: str | None = None, subfolder: str | None = None) -> list[str]:
    """Turn what a user passed (file, first shard, folder, snapshot root) into the list of files to read.

    A folder is searched in `subfolder` first when given (snapshot roots such as a HunyuanVideo community snapshot
    holding `vae/`, `text_encoder/`). Inside a folder an `*.safetensors.index.json` decides the shard set; otherwise
    the sorted `*.safetensors` files are used (a shard family in full, or a single file).
    """
    p = Path(path)
    if not p.exists():
        raise WeightFileError(f"{_where(flag)}{p}: no such file or folder")
    if p.is_dir():
        folder = p / subfolder if subfolder and (p / subfolder).is_dir() else p
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            weight_map = _index_weight_map(indexes[0], flag)
            files = sorted({str(folder / name) for name in weight_map.values()})
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise WeightFileError(f"{_where(flag)}{indexes[0]} lists files that are missing: {', '.join(missing)}")
            if files:
                return files
        candidates = sorted(folder.glob("*.safetensors"))
        if not candidates:
            where = f"{p} (or {p / subfolder})" if subfolder else str(p)
            raise WeightFileError(f"{_where(flag)}{where}: folder holds no .safetensors file")
        family = _shard_family(candidates[0], flag)
        if family is not None:
            return family
        if len(candidates) > 1:
            names = ", ".join(c.name for c in candidates[:5])
            raise WeightFileError(
                f"{_where(flag)}{folder}: several unrelated .safetensors files ({names}); pass one file"
            )
        return [str(candidates[0])]
    return _shard_family(p, flag) or [str(p)]


def read_headers(files: list[str], flag: str | None = None) -> dict[str, TensorInfo]:
    """Union of the headers of several shard files (tensor name -> dtype and shape)."""
    infos: dict[str, TensorInfo] = {}
    for f in files:
        infos.update(read_header(f, flag)[0])
    return infos


def load_state_dict(
    files: list[str] | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    key_filter=None,
    flag: str | None = None,
) -> dict[str, torch.Tensor]:
    """Load tensors from one or several safetensors files, optionally casting floating tensors to `dtype`.

    Each file's header is checked first (`read_header`), so a damaged or foreign file is a WeightFileError naming
    `flag` and the file, never a library error."""
    if isinstance(files, str):
        files = [files]
    state: dict[str, torch.Tensor] = {}
    for path in files:
        read_header(path, flag)
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key_filter is not None and not key_filter(key):
                        continue
                    t = f.get_tensor(key)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    state[key] = t
        except (SafetensorError, OSError) as e:
            raise WeightFileError(f"{_where(flag)}{path}: unreadable safetensors file ({one_line(e)})") from e
    return state


def load_safetensors(
    path: str | os.PathLike, flag: str | None = None, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of one safetensors file a user gave; any fault of the file is a WeightFileError
    naming `flag` and the file."""
    _, metadata = read_header(path, flag)
    return load_state_dict(str(path), device=device, flag=flag), metadata


# Mappings `stream_tensors` is reading: start address -> (mapping, length), for `release_mapped_pages`.
_streamed_mappings: dict[int, tuple[mmap.mmap, int]] = {}


def release_mapped_pages(tensor: torch.Tensor) -> None:
    """Hand back the resident file pages under `tensor` (contiguous) when it is a view of a file `stream_tensors` is
    reading, so a consumer can drop a large tensor block by block; a no-op for any other tensor. Reading the same
    bytes again faults them back in from the file."""
    if tensor.device.type != "cpu" or not tensor.numel() or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    for base, (mapped, length) in _streamed_mappings.items():
        if base <= start and end <= base + length:
            _release_pages(mapped, start - base, end - base)
            return


# A read fault on a file mapping also maps the neighbouring cached pages of the same aligned window (Linux's
# fault-around, 64 KiB by default), including pages before the bytes read that were already handed back.
FAULT_AROUND_BYTES = 1 << 16


def _release_pages(mapped: mmap.mmap, start: int, end: int) -> None:
    """Drop the resident pages of [start, end) from this process, from the start of its fault-around window on.
    They stay in the page cache, and a later read of the same bytes faults them in again from the file (private
    writes to them are discarded)."""
    if not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    first = start - start % max(FAULT_AROUND_BYTES, mmap.PAGESIZE)
    if end > first:
        mapped.madvise(mmap.MADV_DONTNEED, first, end - first)


def data_order(files: list[str] | str, flag: str | None = None) -> list[tuple[str, str, TensorInfo]]:
    """(file, key, info) of every tensor, file by file, each file's tensors in the order of their data."""
    order = []
    for path in [files] if isinstance(files, str) else files:
        infos, _ = read_header(path, flag)
        order += [(path, key, info) for key, info in sorted(infos.items(), key=lambda item: item[1].data_range)]
    return order


def stream_tensors(files: list[str] | str, flag: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one tensor at a time, file by file in data order, from memory-mapped files.

    Each tensor is a zero-copy CPU view of the mapping, valid until the next one is requested: at that point its
    pages are handed back (madvise DONTNEED where the OS has it), so the process never holds more than one tensor
    of the file however large the checkpoint is. Copy what you keep (or derive a new tensor from it). The mapping is
    copy-on-write: writing into a view never reaches the file, and is discarded once the view's pages are released.
    """
    mapped_path, mapped = None, None
    try:
        for path, key, info in data_order(files, flag):
            if path != mapped_path:
                _streamed_mappings.clear()
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    mapped_path = path
                    mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None
                if mapped is not None:
                    _streamed_mappings[_mapped_view(mapped, 0, 1).data_ptr()] = (mapped, size)
            start, end = info.data_range
            dtype = SAFETENSORS_DTYPES[info.dtype]
            if end == start:
                tensor = torch.empty(info.shape, dtype=dtype)
            else:
                tensor = _mapped_view(mapped, start, end).view(dtype).reshape(info.shape)
            yield key, tensor
            del tensor
            _release_pages(mapped, start, end)
    finally:
        _streamed_mappings.clear()


def _mapped_view(mapped: mmap.mmap, start: int, end: int) -> torch.Tensor:
    with warnings.catch_warnings():  # frombuffer warns that the tensor shares the (mmap) buffer
        warnings.simplefilter("ignore")
        return torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=start)


def _packed_header(header: dict) -> bytes:
    """8-byte little-endian length + JSON header padded with spaces to a multiple of 8 bytes (the safetensors rule)."""
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors_streaming(
    path: str | os.PathLike,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors arrive one at a time, in the order of `layout` (key, dtype, shape).

    The header is written from `layout` first, then each tensor's bytes as it comes, so only one tensor is ever in
    memory. Written to a temporary name and renamed at the end: an interrupted run leaves no partial file.
    """
    path = str(path)
    header, offset = {}, 0
    for key, dtype, shape in layout:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        entry = {"dtype": SAFETENSORS_DTYPE_NAMES[dtype], "shape": list(shape)}
        header[key] = entry | {"data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header = {"__metadata__": dict(sorted(metadata.items()))} | header
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(_packed_header(header))
            expected = iter(layout)
            for key, tensor in tensors:
                want = next(expected, None)
                got = (key, tensor.dtype, tuple(tensor.shape))
                if want != got:
                    raise ValueError(f"{path}: streamed tensor {got} where the layout expects {want}")
                f.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            if next(expected, None) is not None:
                raise ValueError(f"{path}: fewer tensors streamed than the layout lists")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Write atomically: to a temporary name in the same folder, then rename, so no half-written file remains."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_path(path)
    try:
        contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(contiguous, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_sharded(
    tensors: dict[str, torch.Tensor], folder: str | os.PathLike, prefix: str, num_shards: int, index_name: str | None
) -> list[str]:
    """Write a Hugging Face style shard family `<prefix>-0000i-of-0000n.safetensors` (+ optional index json)."""
    folder = Path(folder)
    keys = list(tensors)
    per = -(-len(keys) // num_shards)
    names, weight_map = [], {}
    for i in range(num_shards):
        name = f"{prefix}-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per : (i + 1) * per]}
        save_safetensors(part, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        names.append(str(folder / name))
    if index_name:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(folder / index_name, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def deterministic_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file's bytes with the metadata in sorted order.

    The safetensors writer emits `__metadata__` from a hash map, in an order that changes between saves, so the
    same cache written twice would differ byte for byte. Only the header is rewritten (same padding rule: spaces
    up to a multiple of 8 bytes); the tensor entries and data are the library's.
    """
    raw = safetensors_bytes(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    stored = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(stored.items()))} if stored else {}) | header
    return _packed_header(ordered) + raw[8 + length :]


def write_atomically(path: str, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: an interrupted run leaves no partial file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_config_json(folder: str | os.PathLike | None, flag: str | None = None) -> dict | None:
    """`folder/config.json` as a dict; None when `folder` is None or has no config.json. A config.json that is not
    a readable JSON object is refused, naming the flag and the file."""
    if folder is None:
        return None
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightFileError(f"{_where(flag)}{path}: unreadable config.json ({e})") from e
    if not isinstance(config, dict):
        raise WeightFileError(f"{_where(flag)}{path}: config.json holds a {type(config).__name__}, not an object")
    return config
