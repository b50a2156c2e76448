"""Dataset config files (TOML or JSON): strict validation and per-dataset parameter resolution.

A config has an optional `[general]` table, an array of `[[datasets]]` tables and optionally an array of
`[[validation_datasets]]` tables (the same schema; cached like the others, used by training only for the
validation loss). An entry with `video_directory` or `video_jsonl_file` is a video dataset, one with
`image_directory` or `image_jsonl_file` an image dataset.
Each parameter is taken from the first place that sets it (not None): the entry, `[general]`, the calling
script's parsed command line (attributes of the same name, e.g. the cache scripts' `--batch_size`), the default.

Everything here runs before any media is touched; errors name the file, the entry and the key.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from dataset.buckets import RESOLUTION_STEP, BucketSelector
from dataset.frames import FRAME_EXTRACTION_MODES
from hunyuan_model.frame_math import MAX_LATENT_WINDOW_SIZE
from utils.cli import UserError
from utils.toml_file import TomlFileError, read_toml

logger = logging.getLogger(__name__)


class DatasetConfigError(UserError, ValueError):
    """Invalid dataset config; `file`, `entry` (e.g. "[[datasets]] #2") and `key` say where."""

    def __init__(self, message: str, file: str | None = None, entry: str | None = None, key: str | None = None):
        self.file, self.entry, self.key = file, entry, key
        where = [part for part in (file, entry, f"key '{key}'" if key else None) if part]
        super().__init__(": ".join([*where, message]))


# ---------------------------------------------------------------------------------------------------------------
# value checks: each returns the (possibly converted) value or raises _Invalid with what was expected


class _Invalid(Exception):
    pass


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Every integer of a config (counts, frames, repeats, indices) is at most this, and a resolution side at most
# MAX_RESOLUTION_SIDE: larger values are typos that would allocate lists or images of that size at caching or
# training time.
MAX_CONFIG_INTEGER = 100_000
MAX_RESOLUTION_SIDE = 16_384


def _int(minimum: int, maximum: int = MAX_CONFIG_INTEGER) -> Callable[[Any], int]:
    def check(value):
        if not _is_int(value):
            hint = f" (write {int(value)})" if isinstance(value, float) and value.is_integer() else ""
            raise _Invalid(f"an integer, got {_type_name(value)} {value!r}{hint}")
        if value < minimum:
            raise _Invalid(f"an integer >= {minimum}, got {value}")
        if value > maximum:
            raise _Invalid(f"an integer <= {maximum}, got {value}")
        return value

    return check


def _positive_float(value: Any) -> float:
    # strict like musubi-tuner: integers are refused, so `source_fps = 30` must be written 30.0
    if not isinstance(value, float):
        hint = f" (write {value}.0)" if _is_int(value) else ""
        raise _Invalid(f"a float, got {_type_name(value)} {value!r}{hint}")
    if not 0 < value < math.inf:
        raise _Invalid(f"a finite float > 0, got {value}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"a boolean (true or false), got {_type_name(value)} {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"a string, got {_type_name(value)} {value!r}")
    return value


def _int_list(minimum: int) -> Callable[[Any], list[int]]:
    def check(value):
        if not (
            isinstance(value, list) and value and all(_is_int(v) and minimum <= v <= MAX_CONFIG_INTEGER for v in value)
        ):
            raise _Invalid(
                f"a non-empty array of integers >= {minimum} and <= {MAX_CONFIG_INTEGER}, got {_type_name(value)} "
                f"{value!r}"
            )
        return list(value)

    return check


def _resolution(value: Any) -> tuple[int, int]:
    """An integer N (meaning N×N) or [W, H]; each side at least one bucket step, at most MAX_RESOLUTION_SIDE."""
    sides = [value, value] if _is_int(value) else value
    in_range = isinstance(sides, list) and all(_is_int(v) and 16 <= v <= MAX_RESOLUTION_SIDE for v in sides)
    if not (in_range and len(sides) == 2):
        raise _Invalid(
            f"an integer 16 .. {MAX_RESOLUTION_SIDE} or an array [width, height] of two such integers, got {value!r}"
        )
    return (sides[0], sides[1])


def _frame_extraction(value: Any) -> str:
    if value not in FRAME_EXTRACTION_MODES:
        raise _Invalid(f"one of {', '.join(FRAME_EXTRACTION_MODES)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# schema: musubi-tuner's keys and types (plus `fp_latent_window_size` on video datasets, see VIDEO_KEYS)

GENERAL_KEYS: dict[str, Callable[[Any], Any]] = {
    "resolution": _resolution,
    "caption_extension": _str,
    "batch_size": _int(1),
    "num_repeats": _int(1),
    "enable_bucket": _bool,
    "bucket_no_upscale": _bool,
}
IMAGE_KEYS: dict[str, Callable[[Any], Any]] = {
    **GENERAL_KEYS,
    "image_directory": _str,
    "image_jsonl_file": _str,
    "cache_directory": _str,
    "control_directory": _str,
    "fp_latent_window_size": _int(1, MAX_LATENT_WINDOW_SIZE),
    "fp_1f_clean_indices": _int_list(0),
    "fp_1f_target_index": _int(0),
    "fp_1f_no_post": _bool,
}
# musubi-tuner's video schema lacks fp_latent_window_size although its docs use it there (fixed upstream later)
VIDEO_KEYS: dict[str, Callable[[Any], Any]] = {
    **GENERAL_KEYS,
    "video_directory": _str,
    "video_jsonl_file": _str,
    "control_directory": _str,
    "target_frames": _int_list(1),
    "frame_extraction": _frame_extraction,
    "frame_stride": _int(1),
    "frame_sample": _int(1),
    "max_frames": _int(1),
    "cache_directory": _str,
    "source_fps": _positive_float,
    "fp_latent_window_size": _int(1, MAX_LATENT_WINDOW_SIZE),
}
TRAINING_TABLE, VALIDATION_TABLE = "datasets", "validation_datasets"
TOP_LEVEL_KEYS = ("general", TRAINING_TABLE, VALIDATION_TABLE)


@dataclass
class BaseDatasetParams:
    resolution: tuple[int, int] = (960, 544)
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    caption_extension: str | None = None
    batch_size: int = 1
    num_repeats: int = 1
    cache_directory: str | None = None
    debug_dataset: bool = False
    fp_latent_window_size: int = 9
    # where the entry is in the config file (not config keys): its array of tables and 0-based position there
    table: str = field(default=TRAINING_TABLE, compare=False, repr=False, metadata={"config": False})
    position: int = field(default=0, compare=False, repr=False, metadata={"config": False})

    @property
    def label(self) -> str:
        return entry_label(self.position, self.table)

    @property
    def is_validation(self) -> bool:
        return self.table == VALIDATION_TABLE


@dataclass
class ImageDatasetParams(BaseDatasetParams):
    image_directory: str | None = None
    image_jsonl_file: str | None = None
    control_directory: str | None = None
    fp_1f_clean_indices: list[int] | None = None
    fp_1f_target_index: int | None = None
    fp_1f_no_post: bool = False


@dataclass
class VideoDatasetParams(BaseDatasetParams):
    video_directory: str | None = None
    video_jsonl_file: str | None = None
    control_directory: str | None = None
    target_frames: tuple[int, ...] = (1,)
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None


DatasetParams = ImageDatasetParams | VideoDatasetParams


def load_user_config(path: str) -> dict:
    """Parse a `.toml` or `.json` (suffix, any case) config file into a dict, without validating it."""
    if os.path.isdir(path):
        raise DatasetConfigError("is a folder; give a .toml or .json dataset config file", file=str(path))
    if not os.path.isfile(path):
        raise DatasetConfigError("file not found", file=str(path))
    lower = str(path).lower()
    try:
        if lower.endswith(".toml"):
            return read_toml(path)
        if lower.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    except TomlFileError as e:
        raise DatasetConfigError(f"cannot parse: {e.reason}", file=str(path)) from None
    except RecursionError:
        raise DatasetConfigError("cannot parse: arrays or objects nested too deeply", file=str(path)) from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise DatasetConfigError(f"cannot parse: {e}", file=str(path)) from None
    raise DatasetConfigError("not supported config file format (use .toml or .json)", file=str(path))


def _entry_kind(entry: Mapping) -> str:
    return "video" if "video_directory" in entry or "video_jsonl_file" in entry else "image"


def _unknown_key_message(key: str, allowed: Mapping, where: str) -> str:
    if where == "general" and key in {**IMAGE_KEYS, **VIDEO_KEYS}:
        return "not allowed in [general]; set it in each [[datasets]] entry"
    if where == "image" and key in VIDEO_KEYS:
        return "only allowed in video datasets (entries with video_directory or video_jsonl_file)"
    if where == "video" and key in IMAGE_KEYS:
        return "only allowed in image datasets (entries with image_directory or image_jsonl_file)"
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return "unknown key" + (f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(sorted(allowed))}")


def _validate_table(table: Any, schema: Mapping, where: str, file: str | None, entry: str) -> dict:
    if not isinstance(table, dict):
        raise DatasetConfigError(f"expected a table, got {_type_name(table)}", file, entry)
    checked = {}
    for key, value in table.items():
        if key not in schema:
            raise DatasetConfigError(_unknown_key_message(key, schema, where), file, entry, key)
        try:
            checked[key] = schema[key](value)
        except _Invalid as e:
            raise DatasetConfigError(f"expected {e}", file, entry, key) from None
    return checked


def entry_label(index: int, table: str = TRAINING_TABLE) -> str:
    """Human label of the index-th (0-based) entry of a table array: `[[datasets]] #1` is the first."""
    return f"[[{table}]] #{index + 1}"


def validate_user_config(config: Any, file: str | None = None) -> dict:
    """Check keys, types and values of a parsed config; return it with values normalised (resolution → tuple)."""
    if not isinstance(config, dict):
        raise DatasetConfigError(f"expected a table at top level, got {_type_name(config)}", file)
    for key in config:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; only [general] and [[datasets]] are allowed"
            raise DatasetConfigError("unknown top-level key" + hint, file, key=key)
    general = _validate_table(config.get("general", {}), GENERAL_KEYS, "general", file, "[general]")
    tables = {}
    for table in (TRAINING_TABLE, VALIDATION_TABLE):
        entries = config.get(table, [])
        if not isinstance(entries, list):
            raise DatasetConfigError(f"expected an array of tables, got {_type_name(entries)}", file, key=table)
        if table == TRAINING_TABLE and not entries:
            raise DatasetConfigError("no [[datasets]] entries", file)
        tables[table] = [_validate_entry(entry, entry_label(index, table), file) for index, entry in enumerate(entries)]
    return {"general": general, **tables}


def _validate_entry(entry: Any, label: str, file: str | None) -> dict:
    kind = _entry_kind(entry) if isinstance(entry, dict) else "image"
    schema = VIDEO_KEYS if kind == "video" else IMAGE_KEYS
    entry = _validate_table(entry, schema, kind, file, label)
    sources = [k for k in (f"{kind}_directory", f"{kind}_jsonl_file") if k in entry]
    if not sources:
        raise DatasetConfigError(
            "needs one of image_directory, image_jsonl_file, video_directory, video_jsonl_file", file, label
        )
    if len(sources) == 2:
        raise DatasetConfigError(f"set either {sources[0]} or {sources[1]}, not both", file, label)
    return entry


def _namespace_values(namespace: Any) -> dict:
    """Non-None attributes of the calling script's argparse namespace (or a dict)."""
    if namespace is None:
        return {}
    values = dict(namespace) if isinstance(namespace, Mapping) else dict(vars(namespace))
    debug = values.get("debug_dataset")
    if debug is not None and not isinstance(debug, bool):
        raise TypeError(f"debug_dataset must be a bool, got {debug!r}")
    return {k: v for k, v in values.items() if v is not None}


def resolve_dataset_params(config: dict, namespace: Any = None, file: str | None = None) -> list[DatasetParams]:
    """Per-dataset parameters of a validated config, looked up entry → [general] → command line → default; the
    `[[datasets]]` entries first, then the `[[validation_datasets]]` ones.

    Also checks what can be checked without reading media: JSONL datasets need `cache_directory`, and every
    dataset needs its own cache directory (after defaulting to its media directory).
    """
    general = config.get("general", {})
    cli = _namespace_values(namespace)
    resolved: list[DatasetParams] = []
    entries = [
        (table, index, entry)
        for table in (TRAINING_TABLE, VALIDATION_TABLE)
        for index, entry in enumerate(config.get(table, []))
    ]
    for table, index, entry in entries:
        klass = VideoDatasetParams if _entry_kind(entry) == "video" else ImageDatasetParams
        values = {"table": table, "position": index}
        for param in fields(klass):
            if not param.metadata.get("config", True):
                continue
            for source in (entry, general, cli):
                if source.get(param.name) is not None:
                    values[param.name] = source[param.name]
                    break
        params = klass(**values)
        jsonl = params.video_jsonl_file if klass is VideoDatasetParams else params.image_jsonl_file
        if jsonl is not None and params.cache_directory is None:
            raise DatasetConfigError(
                "JSONL datasets need cache_directory (there is no media directory to default to)",
                file,
                params.label,
                "cache_directory",
            )
        check_bucket_step(params, file)
        if klass is VideoDatasetParams and params.frame_extraction == "chunk" and 1 in params.target_frames:
            logger.warning(f"{params.label}: 'chunk' with target_frames 1 makes an item of every single frame")
        resolved.append(params)

    seen: dict[str, DatasetParams] = {}
    for params in resolved:
        directory = os.path.normpath(os.path.abspath(effective_cache_directory(params)))
        if directory in seen:
            raise DatasetConfigError(
                f"cache directory {directory} is also used by {seen[directory].label}; each dataset needs "
                "its own (it defaults to the image/video directory)",
                file,
                params.label,
                "cache_directory",
            )
        seen[directory] = params
    return resolved


def check_bucket_step(params: DatasetParams, file: str | None) -> None:
    """Warn about `resolution` sides that are not multiples of the 16-pixel bucket step, saying what is done, as
    musubi-tuner does it: an image dataset without enable_bucket resizes every image to exactly `resolution`;
    otherwise (video datasets always bucket) `resolution` only sets the bucket area, and the warning names the
    bucket a frame of that very shape gets."""
    width, height = params.resolution
    if width % RESOLUTION_STEP == 0 and height % RESOLUTION_STEP == 0:
        return
    if isinstance(params, ImageDatasetParams) and not params.enable_bucket:
        logger.warning(
            f"{params.label}: resolution {width}x{height} is not a multiple of {RESOLUTION_STEP}; without "
            f"enable_bucket images are resized to exactly {width}x{height}: use e.g. "
            f"[{_step_multiple(width)}, {_step_multiple(height)}]"
        )
        return
    bucket = BucketSelector((width, height)).get_bucket_resolution((width, height))
    logger.warning(
        f"{params.label}: resolution {width}x{height} is not a multiple of {RESOLUTION_STEP}; it sets only the bucket "
        f"area ({width * height} pixels): a {width}x{height} frame is cached as {bucket[0]}x{bucket[1]}"
    )


def _step_multiple(side: int) -> int:
    return max(RESOLUTION_STEP, round(side / RESOLUTION_STEP) * RESOLUTION_STEP)


def effective_cache_directory(params: DatasetParams) -> str:
    """`cache_directory`, or the media directory when it is not set."""
    if params.cache_directory is not None:
        return params.cache_directory
    directory = params.video_directory if isinstance(params, VideoDatasetParams) else params.image_directory
    if directory is None:
        raise ValueError("cache_directory is required for JSONL datasets")
    return directory


def load_dataset_params(path: str, namespace: Any = None) -> list[DatasetParams]:
    """Load, validate and resolve a dataset config file: the one call the scripts make before any media work.
    Training and validation datasets alike (the caching scripts cache both; `is_validation` tells them apart)."""
    config = validate_user_config(load_user_config(path), file=str(path))
    return resolve_dataset_params(config, namespace, file=str(path))
