"""Optimizers (`--optimizer_type`, `--optimizer_args`) and learning-rate schedulers (`--lr_scheduler*`).

Names and semantics are musubi-tuner's. Fixed here: the empty default `--optimizer_type` means AdamW (the
reference fails on it), schedule-free optimizers get a working no-op scheduler (musubi-tuner raises TypeError),
and `piecewise_constant` is built in (musubi-tuner takes it from diffusers).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from utils.cli import MissingPackageError, UsageError

logger = logging.getLogger(__name__)

DEFAULT_OPTIMIZER = "AdamW"


def parse_kwargs(items: list[str] | None, flag: str) -> dict[str, Any]:
    """`key=value` strings -> kwargs, values read as Python literals (split at the first `=`)."""
    kwargs = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise UsageError(f"{flag} {item!r}: the value must be a Python literal (quote strings)") from None
    return kwargs


@dataclass
class OptimizerInfo:
    optimizer: torch.optim.Optimizer
    name: str  # `<module>.<Class>`, for logs and ss_optimizer
    args: str  # `k=v,...`
    schedule_free: bool
    learning_rate: float | None  # the effective --learning_rate (None for Adafactor with relative steps)
    lr_scheduler: str  # the effective --lr_scheduler (`adafactor:<lr>` for Adafactor with relative steps)

    def train(self) -> None:
        """Schedule-free optimizers switch their parameters between train and eval points."""
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()

    def eval(self) -> None:
        if hasattr(self.optimizer, "eval") and callable(self.optimizer.eval):
            self.optimizer.eval()


def _import_class(name: str, default_module, flag: str):
    """A class from `default_module` (plain name) or from `package.module.Class`."""
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UsageError(f"{flag} {name}: cannot import {module_name} ({e})") from None
    else:
        module, class_name = default_module, name
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UsageError(f"{flag} {name}: {module.__name__} has no {class_name}")
    return cls


def create_optimizer(args: argparse.Namespace, params: list[dict]) -> OptimizerInfo:
    """The optimizer named by --optimizer_type over the network's parameter groups. Adafactor with relative steps
    replaces the learning rate by None and the scheduler by `adafactor:<lr>`, as musubi-tuner does; the effective
    values are in the result (the flags are left as given)."""
    name = args.optimizer_type or DEFAULT_OPTIMIZER
    if not args.optimizer_type:
        logger.info(f"--optimizer_type not given: using {DEFAULT_OPTIMIZER}")
    lower = name.lower()
    kwargs = parse_kwargs(args.optimizer_args, "--optimizer_args")
    lr = args.learning_rate
    scheduler = args.lr_scheduler
    cls = None
    if lower.endswith("8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise MissingPackageError(
                f"--optimizer_type {name} needs the bitsandbytes package, which is not installed "
                "(pip install bitsandbytes, CUDA only); use --optimizer_type AdamW instead"
            ) from None
        if lower == "adamw8bit":
            cls = bnb.optim.AdamW8bit
    elif lower == "adafactor":
        from transformers.optimization import Adafactor

        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            logger.info("Adafactor: warmup_init=True needs relative_step=True; setting it")
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            if lr != 0.0:
                logger.warning("Adafactor relative_step: --learning_rate is used as the initial lr")
            scheduler = f"adafactor:{lr}"
            lr = None
        else:
            if args.max_grad_norm != 0.0:
                logger.warning("Adafactor: gradient clipping is on; consider --max_grad_norm 0")
            if args.lr_scheduler != "constant_with_warmup":
                logger.warning("Adafactor: --lr_scheduler constant_with_warmup is suggested")
            if kwargs.get("clip_threshold", 1.0) != 1.0:
                logger.warning("Adafactor: clip_threshold=1.0 is suggested")
        cls = Adafactor
    elif lower == "adamw":
        cls = torch.optim.AdamW
    if cls is None:
        cls = _import_class(name, torch.optim, "--optimizer_type")
    logger.info(f"optimizer {cls.__module__}.{cls.__name__} {kwargs}")
    optimizer = cls(params, lr=lr, **kwargs)
    return OptimizerInfo(
        optimizer,
        f"{cls.__module__}.{cls.__name__}",
        ",".join(f"{k}={v}" for k, v in kwargs.items()),
        lower.endswith("schedulefree"),
        lr,
        scheduler,
    )


class ConstantLRScheduler:
    """No-op scheduler for schedule-free optimizers: `step` does nothing, `get_last_lr` reports the group lrs."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def piecewise_constant_schedule(optimizer: torch.optim.Optimizer, step_rules: str, last_epoch: int = -1):
    """`step_rules` like "1:10,0.1:20,0.01": multiplier 1 before step 10, 0.1 before 20, then 0.01."""
    rules = []
    *pairs, last = step_rules.split(",")
    for pair in pairs:
        multiplier, _, until = pair.partition(":")
        rules.append((int(until), float(multiplier)))
    final = float(last)

    def factor(step: int) -> float:
        for until, multiplier in rules:
            if step < until:
                return multiplier
        return final

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last_epoch)


def _steps(value: int | float | None, total: int) -> int | None:
    """A step count, or a ratio (float) of the total steps."""
    return int(value * total) if isinstance(value, float) else value


def create_lr_scheduler(args: argparse.Namespace, info: OptimizerInfo, num_processes: int):
    """The scheduler named by --lr_scheduler (or --lr_scheduler_type); totals count every process's steps, since
    accelerate steps a prepared scheduler once per process."""
    optimizer = info.optimizer
    if info.schedule_free:
        return ConstantLRScheduler(optimizer)
    name = info.lr_scheduler
    total = args.max_train_steps * num_processes
    warmup = _steps(args.lr_warmup_steps, total)
    decay = _steps(args.lr_decay_steps, total)
    kwargs = parse_kwargs(args.lr_scheduler_args, "--lr_scheduler_args")

    if args.lr_scheduler_type:
        cls = _import_class(args.lr_scheduler_type, torch.optim.lr_scheduler, "--lr_scheduler_type")
        logger.info(f"lr scheduler {cls.__name__} {kwargs}")
        return cls(optimizer, **kwargs)

    def no_warmup(scheduler):
        if warmup:
            raise UsageError(f"--lr_scheduler {name} takes no warmup; set --lr_warmup_steps 0")
        return scheduler

    if name.startswith("adafactor"):
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise UsageError("--lr_scheduler adafactor needs --optimizer_type Adafactor")
        return no_warmup(AdafactorSchedule(optimizer, float(name.split(":")[1])))
    if name == "piecewise_constant":
        if "step_rules" not in kwargs:
            raise UsageError("--lr_scheduler piecewise_constant needs --lr_scheduler_args \"step_rules='1:10,0.1'\"")
        return piecewise_constant_schedule(optimizer, **kwargs)

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    try:
        kind = SchedulerType(name)
    except ValueError:
        known = ", ".join([s.value for s in SchedulerType] + ["piecewise_constant", "adafactor"])
        raise UsageError(f"--lr_scheduler {name}: unknown (known: {known})") from None
    schedule = TYPE_TO_SCHEDULER_FUNCTION[kind]
    cycles, power = args.lr_scheduler_num_cycles, args.lr_scheduler_power
    min_lr_ratio = args.lr_scheduler_min_lr_ratio
    if kind == SchedulerType.CONSTANT:
        return no_warmup(schedule(optimizer, **kwargs))
    if kind == SchedulerType.CONSTANT_WITH_WARMUP:
        return schedule(optimizer, num_warmup_steps=warmup, **kwargs)
    if kind == SchedulerType.INVERSE_SQRT:
        return schedule(optimizer, num_warmup_steps=warmup, timescale=args.lr_scheduler_timescale, **kwargs)
    common = dict(num_warmup_steps=warmup, num_training_steps=total)
    if kind == SchedulerType.COSINE_WITH_RESTARTS:
        return schedule(optimizer, **common, num_cycles=cycles, **kwargs)
    if kind == SchedulerType.POLYNOMIAL:
        return schedule(optimizer, **common, power=power, **kwargs)
    if kind == SchedulerType.COSINE_WITH_MIN_LR:
        return schedule(optimizer, **common, num_cycles=cycles / 2, min_lr_rate=min_lr_ratio, **kwargs)
    if kind in (SchedulerType.LINEAR, SchedulerType.COSINE):
        return schedule(optimizer, **common, **kwargs)
    if kind == SchedulerType.WARMUP_STABLE_DECAY:
        return schedule(
            optimizer,
            num_warmup_steps=warmup,
            num_stable_steps=total - warmup - decay,
            num_decay_steps=decay,
            num_cycles=cycles / 2,
            min_lr_ratio=min_lr_ratio if min_lr_ratio is not None else 0.0,
            **kwargs,
        )
    return schedule(optimizer, **common, num_decay_steps=decay, **kwargs)
