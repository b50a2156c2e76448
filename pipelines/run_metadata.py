"""What an output records about how it was made, and re-running from it.

Every saved latent, mp4 and PNG carries, besides the reference's keys, one key `fpack_settings`: a JSON object with
the seed, every generation flag (paths absolute), the LoRAs with multipliers and fingerprints, and the model files
with fingerprints (`utils.file_hash.quick_hash`). From it:
- `--from_metadata FILE` re-creates the generation (flags given on the same command line win),
- `--show_metadata FILE` prints it as a command line,
- `--skip_done` recognizes finished prompt lines by the `job` key (a hash of the settings that decide the result).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import shlex
from collections.abc import Iterable

from utils.cli import UserError
from utils.file_hash import HASH_SCHEME, quick_hash
from utils.safetensors_utils import WeightFileError, read_header
from utils.video_io import read_png_metadata, read_video_metadata

logger = logging.getLogger(__name__)

SETTINGS_KEY = "fpack_settings"
SETTINGS_VERSION = 1
FRAMES_KEY = "frames"  # pixel frames an mp4 or PNG sequence holds (in the top-level metadata)

# Flags that choose what a command does, not what one generation is: never recorded.
NOT_RECORDED = frozenset(
    {
        "from_file", "interactive", "latent_path", "from_metadata", "show_metadata", "skip_done", "seeds",
        "n_seeds", "save_merged_model", "seed",
    }
)  # fmt: skip
# Recorded, but they do not change which result a line asks for (where and how it is computed and saved).
NOT_IN_JOB = frozenset(
    {
        "save_path", "output_type", "no_metadata", "preview", "device", "attn_mode", "blocks_to_swap",
        "vae_chunk_size", "vae_spatial_tile_sample_min_size", "bulk_decode",
    }
)  # fmt: skip
MODEL_FLAGS = ("dit", "vae", "text_encoder1", "text_encoder2", "image_encoder", "tokenizer1", "tokenizer2")
PATH_FLAGS = (
    *MODEL_FLAGS, "end_image_path", "control_image_path", "control_image_mask_path", "lora_weight", "extend_video"
)  # fmt: skip


class MetadataError(UserError, ValueError):
    """A file given to --from_metadata / --show_metadata that holds no usable settings."""


@functools.lru_cache(maxsize=64)
def _cached_hash(path: str, size: int, mtime_ns: int) -> str:
    return quick_hash(path)


def fingerprint(path: str) -> str | None:
    """quick-sha256 of a local file or folder (cached per size and modification time); None for hub ids."""
    if not os.path.exists(path):
        return None
    stat = os.stat(path)
    return _cached_hash(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def _absolute(value):
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    if isinstance(value, str) and os.path.exists(value):
        return os.path.abspath(value)
    return value


def _absolute_image_spec(value: str | None):
    """A path, or a `SECTION:path;;;...` spec, with each existing file made absolute."""
    if not value or os.path.exists(value):
        return _absolute(value)
    parts = []
    for part in value.split(";;;"):
        key, sep, path = part.partition(":")
        parts.append(f"{key}{sep}{_absolute(path)}" if sep else _absolute(part))
    return ";;;".join(parts)


def recorded_flags(args: argparse.Namespace, dests: Iterable[str]) -> dict:
    flags = {}
    for dest in dests:
        if dest in NOT_RECORDED or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if dest in PATH_FLAGS:
            value = _absolute(value)
        elif dest == "image_path":
            value = _absolute_image_spec(value)
        flags[dest] = list(value) if isinstance(value, tuple) else value
    return flags


def job_key(flags: dict, seed: int | None) -> str:
    """Hash of what decides a result: the recorded flags except where/how it is computed, and the seed."""
    identity = {k: v for k, v in sorted(flags.items()) if k not in NOT_IN_JOB}
    if seed is not None:
        identity["seed"] = seed
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def generation_settings(args: argparse.Namespace, seed: int, dests: Iterable[str], multipliers: list[float]) -> dict:
    """The `fpack_settings` object for one generation."""
    flags = recorded_flags(args, dests)
    loras = [
        {"path": path, "multiplier": m, "hash": fingerprint(path)}
        for path, m in zip(flags.get("lora_weight") or [], multipliers)
    ]
    models = {flag: {"path": flags[flag], "hash": fingerprint(flags[flag])} for flag in MODEL_FLAGS if flags.get(flag)}
    return {
        "version": SETTINGS_VERSION,
        "seed": seed,
        "flags": flags,
        "loras": loras,
        "models": models,
        "hash_scheme": HASH_SCHEME,
        "job": job_key(flags, seed),
        "job_any_seed": job_key(flags, None),
    }


def settings_to_metadata(settings: dict) -> dict[str, str]:
    return {SETTINGS_KEY: json.dumps(settings, ensure_ascii=False, sort_keys=True)}


# ---- reading -------------------------------------------------------------------------------------------------------


def read_file_metadata(path: str) -> dict[str, str]:
    """The metadata dict of one of our outputs: a latent (.safetensors), an mp4 or a PNG; {} when it has none."""
    lower = path.lower()
    if lower.endswith(".safetensors"):
        return dict(read_header(path)[1])
    if lower.endswith(".mp4"):
        return read_video_metadata(path)
    if lower.endswith(".png"):
        return read_png_metadata(path)
    raise MetadataError(f"{path}: not a latent (.safetensors), mp4 or PNG")


def read_settings(path: str, flag: str = "--from_metadata") -> dict:
    """The `fpack_settings` object of an output; MetadataError naming the flag and file when there is none."""
    if not os.path.isfile(path):
        raise MetadataError(f"{flag} {path}: file not found")
    try:
        metadata = read_file_metadata(path)
    except (MetadataError, WeightFileError) as e:
        raise MetadataError(f"{flag} {e}") from None
    except Exception as e:  # unreadable container / header
        raise MetadataError(f"{flag} {path}: cannot read its metadata ({e})") from None
    text = metadata.get(SETTINGS_KEY)
    if not text:
        hint = " (written with --no_metadata, or by another tool?)" if not metadata else ""
        raise MetadataError(f"{flag} {path}: no generation settings recorded{hint}")
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetadataError(f"{flag} {path}: its recorded generation settings are damaged ({e})") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("flags"), dict):
        raise MetadataError(f"{flag} {path}: its recorded generation settings are damaged (no flags recorded)")
    if settings.get("version") != SETTINGS_VERSION:
        raise MetadataError(f"{flag} {path}: settings version {settings.get('version')} is not {SETTINGS_VERSION}")
    return settings


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The flags actually typed on the command line. `parser` is a fresh one: its defaults are cleared."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv)
    return set(vars(given))


def apply_settings(args: argparse.Namespace, settings: dict, explicit: set[str], source: str) -> None:
    """Set every recorded flag the command line did not give; warn when a model or LoRA file changed since."""
    for dest, value in settings["flags"].items():
        if dest not in explicit and hasattr(args, dest):
            setattr(args, dest, value)
    if "seed" not in explicit:
        args.seed = settings["seed"]
    recorded = {entry["path"]: entry["hash"] for entry in [*settings["models"].values(), *settings["loras"]]}
    for path, expected in recorded.items():
        if expected is None or not os.path.exists(path):
            continue
        if fingerprint(path) != expected:
            logger.warning(f"{source}: {path} differs from the file it was made with; the result will differ")


def command_line(settings: dict, parser: argparse.ArgumentParser, script: str = "fpack_generate_video.py") -> str:
    """The recorded generation as a shell command (defaults left out)."""
    flags = dict(settings["flags"], seed=settings["seed"])
    words = ["python", script]
    for action in parser._actions:
        if not action.option_strings or action.dest not in flags:
            continue
        value, option = flags[action.dest], action.option_strings[0]
        default = action.default
        if value is None or value == default or (isinstance(default, (list, tuple)) and value == list(default)):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                words.append(option)
        elif isinstance(value, list):
            if value:
                words += [option, *map(str, value)]
        else:
            words += [option, str(value)]
    return shlex.join(words)


# ---- finished jobs -------------------------------------------------------------------------------------------------


def _output_files(folder: str) -> Iterable[str]:
    """Our outputs in `folder` and its image sub-folders; temporary files (interrupted writes) and previews skipped."""
    if not os.path.isdir(folder):
        return
    for root, dirs, files in os.walk(folder):
        if root != folder and os.path.dirname(root) != folder:
            dirs[:] = []
            continue
        for name in sorted(files):
            if ".tmp" in name or "_preview." in name:
                continue
            if name.lower().endswith((".safetensors", ".mp4", ".png")):
                yield os.path.join(root, name)


def finished_outputs(folder: str) -> dict[str, set[str]]:
    """job key -> kinds of finished output ('latent', 'video', 'images') found in `folder` (by metadata)."""
    found: dict[str, set[str]] = {}
    image_counts: dict[tuple[str, str], int] = {}
    image_needed: dict[tuple[str, str], int] = {}
    for path in _output_files(folder):
        try:
            metadata = read_file_metadata(path)
            settings = json.loads(metadata[SETTINGS_KEY])
        except Exception:  # not ours, no settings, or unreadable: not a finished output
            continue
        keys = (settings.get("job"), settings.get("job_any_seed"))
        if path.endswith(".png"):
            for key in keys:
                group = (key, os.path.dirname(path))
                image_counts[group] = image_counts.get(group, 0) + 1
                image_needed[group] = int(metadata.get(FRAMES_KEY, 1))
            continue
        kind = "latent" if path.endswith(".safetensors") else "video"
        for key in keys:
            found.setdefault(key, set()).add(kind)
    for (key, _), count in image_counts.items():
        if count >= image_needed[(key, _)]:
            found.setdefault(key, set()).add("images")
    return found


def required_kinds(output_type: str, one_frame: bool) -> set[str]:
    """What --output_type writes: one-frame 'video' is PNGs."""
    kinds = {
        "video": {"video"},
        "latent": {"latent"},
        "both": {"video", "latent"},
        "images": {"images"},
        "latent_images": {"latent", "images"},
    }[output_type]
    return {"images" if (k == "video" and one_frame) else k for k in kinds}
