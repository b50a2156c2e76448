"""Loss bookkeeping and experiment trackers (`--logging_dir`, `--log_with`, ...)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time

from accelerate.tracking import GeneralTracker

from utils.cli import MissingPackageError, UsageError
from utils.toml_file import read_toml

logger = logging.getLogger(__name__)

DEFAULT_TRACKER_NAME = "network_train"
SENSITIVE_KEYS = ("wandb_api_key", "huggingface_token")
PATH_KEYS = (
    "dit",
    "vae",
    "text_encoder1",
    "text_encoder2",
    "base_weights",
    "network_weights",
    "output_dir",
    "logging_dir",
)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
JSONL_NAME = "metrics.jsonl"


class LossRecorder:
    """Moving average over the last epoch: epoch 1 appends each loss, later epochs replace the same position."""

    def __init__(self):
        self.losses: list[float] = []
        self.total = 0.0

    def add(self, epoch: int, step: int, loss: float) -> None:
        if epoch == 0 or step >= len(self.losses):
            self.losses.append(loss)
        else:
            self.total -= self.losses[step]
            self.losses[step] = loss
        self.total += loss

    @property
    def moving_average(self) -> float:
        return self.total / max(len(self.losses), 1)


class JsonlTracker(GeneralTracker):
    """One JSON object per `log` call in `<logging_dir>/metrics.jsonl`: what --logging_dir writes when tensorboard
    is not installed."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.path = os.path.join(logging_dir, JSONL_NAME)
        self.run_name = run_name

    @property
    def tracker(self):
        return self.path

    def _write(self, record: dict) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def store_init_configuration(self, values: dict) -> None:
        self._write({"config": values})

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._write({"step": step, "time": time.time(), **values})


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def logging_directory(args: argparse.Namespace) -> str | None:
    if args.logging_dir is None:
        return None
    return os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime()))


def check_trackers(args: argparse.Namespace, logging_dir: str | None) -> list[str]:
    """The trackers --log_with names, each installed, with the --logging_dir tensorboard needs (checked before
    anything loads)."""
    if args.log_with is None:
        return []
    wanted = ["tensorboard", "wandb"] if args.log_with == "all" else [args.log_with]
    if "tensorboard" in wanted and logging_dir is None:
        raise UsageError(f"--log_with {args.log_with} needs --logging_dir")
    for name in wanted:
        if not _installed(TRACKER_PACKAGES[name]):
            raise MissingPackageError(
                f"--log_with {args.log_with} needs the {TRACKER_PACKAGES[name]} package, which is not installed "
                f"(pip install {TRACKER_PACKAGES[name]})"
            )
    return wanted


def resolve_trackers(args: argparse.Namespace, logging_dir: str | None) -> list | None:
    """The `log_with` of the Accelerator. Explicit trackers must be installed (an error names the package); the
    implicit tensorboard of --logging_dir is used when installed. With --logging_dir the values are always also
    written as JSON lines (`metrics.jsonl`), readable without any tracker package."""
    if args.log_with is None:
        if logging_dir is None:
            return None
        jsonl = JsonlTracker(args.log_tracker_name or DEFAULT_TRACKER_NAME, logging_dir)
        if _installed("tensorboard"):
            return ["tensorboard", jsonl]
        logger.warning(f"tensorboard is not installed: writing the logs to {os.path.join(logging_dir, JSONL_NAME)}")
        return [jsonl]
    wanted = check_trackers(args, logging_dir)
    if "wandb" in wanted:
        import wandb

        if logging_dir is not None:
            os.makedirs(logging_dir, exist_ok=True)
            os.environ["WANDB_DIR"] = logging_dir
        if args.wandb_api_key is not None:
            wandb.login(key=args.wandb_api_key)
    if logging_dir is not None:
        return [*wanted, JsonlTracker(args.log_tracker_name or DEFAULT_TRACKER_NAME, logging_dir)]
    return wanted


def tracker_config(args: argparse.Namespace) -> dict:
    """--log_config: the arguments without secrets and local paths; lists and objects as strings."""
    config = {}
    for key, value in vars(args).items():
        if key in SENSITIVE_KEYS or key in PATH_KEYS:
            continue
        config[key] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return config


def init_trackers(accelerator, args: argparse.Namespace) -> None:
    init_kwargs: dict = {}
    if args.wandb_run_name:
        init_kwargs["wandb"] = {"name": args.wandb_run_name}
    if args.log_tracker_config is not None:
        init_kwargs = read_toml(args.log_tracker_config, "--log_tracker_config")
    accelerator.init_trackers(
        args.log_tracker_name or DEFAULT_TRACKER_NAME,
        config=tracker_config(args) if args.log_config else None,
        init_kwargs=init_kwargs,
    )


def step_logs(
    current_loss: float,
    average_loss: float,
    lrs: list[float],
    descriptions: list[str],
    optimizer=None,
    optimizer_type: str = "",
    max_norm: tuple | None = None,
    step_seconds: float | None = None,
    timesteps: list[float] | None = None,
) -> dict:
    """Per-step tracker values: loss/current, loss/average, lr/<group>, d*lr for D-Adaptation/Prodigy, max-norm,
    and the statistics of the batch's timesteps (timestep/mean, /min, /max)."""
    logs = {"loss/current": current_loss, "loss/average": average_loss}
    if timesteps:
        logs["timestep/mean"] = sum(timesteps) / len(timesteps)
        logs["timestep/min"], logs["timestep/max"] = min(timesteps), max(timesteps)
    if step_seconds is not None:
        logs["time/step_seconds"] = step_seconds
    if max_norm is not None:
        logs["max_norm/keys_scaled"], logs["max_norm/average_key_norm"], logs["max_norm/max_key_norm"] = max_norm
    kind = optimizer_type.lower()
    adaptive = kind.startswith("dadapt") or kind == "prodigy" or kind.endswith("prodigyplusschedulefree")
    for i, lr in enumerate(lrs):
        desc = descriptions[i] if i < len(descriptions) else f"group{i}"
        logs[f"lr/{desc}"] = float(lr)
        logs[f"lr/group{i}"] = float(lr)
        if adaptive and optimizer is not None:
            group = optimizer.param_groups[i]
            logs[f"lr/d*lr/{desc}"] = group["d"] * group["lr"]
    return logs
