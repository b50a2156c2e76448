"""What training writes: LoRA files with their metadata, accelerate states, the resume position, Hub uploads.

Names (in --output_dir):  every N epochs `<name>-<epoch:06d>.safetensors`, every N steps
`<name>-step<step:08d>.safetensors`, at the end `<name>.safetensors`; states are the same names with `-state`
(folders). With `--save_diffusers_lora` each LoRA file gets a `<name>.diffusers.safetensors` twin in the
diffusers/PEFT layout (alpha folded into the factors), saved, pruned and uploaded with it. LoRA files and state
folders appear complete or not at all (written under a temporary name, then renamed). Metadata: musubi-tuner's
`ss_*` keys (with `ss_session_id` spelled right; musubi-tuner wrote `ss_ss_session_id`) and `modelspec.*`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from networks.lora_convert import export_lora_file, load_lora_file
from utils.cli import UsageError
from utils.temporary_files import remove_leftover_temporary_files, remove_temporary_files

logger = logging.getLogger(__name__)

SAVE_DTYPE = torch.bfloat16  # every saved LoRA tensor, as musubi-tuner
BASE_MODEL_VERSION = "framepack"
MODELSPEC_VERSION = "1.0.0"
MODELSPEC_ARCHITECTURE = "framepack/lora"
MODELSPEC_IMPLEMENTATION = "https://github.com/lllyasviel/FramePack"
MODELSPEC_RESOLUTION = "1280x720"  # musubi-tuner's placeholder
MINIMUM_METADATA_KEYS = (
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)
TRAINER_STATE_FILE = "trainer_state.json"
STATE_SUFFIX = "-state"
TEMPORARY_STATE_SUFFIX = ".tmp"  # `<name>-state.tmp`: a state folder being written
DIFFUSERS_SUFFIX = ".diffusers"  # `<name>.diffusers.safetensors`: the --save_diffusers_lora export


# ---- names ---------------------------------------------------------------------------------------------------------


def epoch_name(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}"


def step_name(name: str, step: int) -> str:
    return f"{name}-step{step:08d}"


def removable_epoch(epoch: int, every: int | None, keep: int | None) -> int | None:
    """The epoch save that falls out of the last `keep` when epoch `epoch` is saved."""
    if not keep or not every:
        return None
    old = epoch - every * keep
    return old if old > 0 else None


def removable_step(step: int, every: int | None, keep: int | None) -> int | None:
    """The step save older than the last `keep` steps: (step − keep − 1) rounded down to a multiple of `every`."""
    if keep is None or not every:
        return None
    old = step - keep - 1
    old -= old % every
    return old if old > 0 else None


@dataclass(frozen=True)
class SavePlan:
    """One periodic save: its name, and the older LoRA and state saves that fall out of their keep windows."""

    name: str
    old_lora: str | None
    old_state: str | None


def step_save_plan(
    output_name: str, step: int, every: int | None, keep: int | None, keep_states: int | None
) -> SavePlan:
    """The save at `step` (every `--save_every_n_steps`), keeping the LoRAs of the last `keep` steps
    (`--save_last_n_steps`) and the states of the last `keep_states` steps (`--save_last_n_steps_state`, default:
    `keep`)."""
    return _save_plan(step_name, removable_step, output_name, step, every, keep, keep_states)


def epoch_save_plan(
    output_name: str, epoch: int, every: int | None, keep: int | None, keep_states: int | None
) -> SavePlan:
    """The save at `epoch` (every `--save_every_n_epochs`), keeping the last `keep` epoch LoRAs
    (`--save_last_n_epochs`) and the last `keep_states` epoch states (`--save_last_n_epochs_state`, default:
    `keep`)."""
    return _save_plan(epoch_name, removable_epoch, output_name, epoch, every, keep, keep_states)


def _save_plan(name_of, removable, output_name: str, number: int, every, keep, keep_states) -> SavePlan:
    old, old_state = removable(number, every, keep), removable(number, every, keep_states or keep)
    return SavePlan(
        name_of(output_name, number),
        None if old is None else name_of(output_name, old),
        None if old_state is None else name_of(output_name, old_state),
    )


# ---- metadata ------------------------------------------------------------------------------------------------------


def training_metadata(
    args: argparse.Namespace,
    *,
    session_id: int,
    started_at: float,
    num_train_items: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    optimizer_name: str,
    optimizer_args: str,
    datasets: list[dict],
) -> dict[str, str]:
    """The `ss_*` metadata fixed for the whole run (values as strings, as musubi-tuner stores them)."""
    optimizer = optimizer_name + (f"({optimizer_args})" if optimizer_args else "")
    metadata = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_num_train_items": num_train_items,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_mixed_precision": args.mixed_precision,
        "ss_seed": args.seed,
        "ss_training_comment": args.training_comment,
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_fp8_base": bool(args.fp8_base),
        "ss_full_fp16": False,
        "ss_full_bf16": False,
        "ss_weighting_scheme": args.weighting_scheme,
        "ss_logit_mean": args.logit_mean,
        "ss_logit_std": args.logit_std,
        "ss_mode_scale": args.mode_scale,
        "ss_guidance_scale": args.guidance_scale,
        "ss_timestep_sampling": args.timestep_sampling,
        "ss_sigmoid_scale": args.sigmoid_scale,
        "ss_discrete_flow_shift": args.discrete_flow_shift,
        "ss_datasets": json.dumps(datasets),
    }
    if args.network_args:
        metadata["ss_network_args"] = json.dumps(dict(item.partition("=")[::2] for item in args.network_args))
    metadata["ss_sd_model_name"] = os.path.basename(args.dit) if os.path.exists(args.dit) else args.dit
    if args.vae is not None:
        metadata["ss_vae_name"] = os.path.basename(args.vae)
    metadata = {k: str(v) for k, v in metadata.items()}
    if args.no_metadata:
        metadata = {k: v for k, v in metadata.items() if k in MINIMUM_METADATA_KEYS}
    return metadata


def save_metadata(args: argparse.Namespace, base: dict[str, str], steps: int, epoch: int) -> dict[str, str]:
    """Metadata of one save: the run's keys, the save's time/step/epoch, and modelspec."""
    metadata = dict(base)
    now = time.time()
    if not args.no_metadata:
        metadata.update(ss_training_finished_at=str(now), ss_steps=str(steps), ss_epoch=str(epoch))
    title = args.metadata_title or args.output_name or f"LoRA@{datetime.datetime.fromtimestamp(now):%Y%m%d-%H%M%S}"
    metadata.update(
        {
            "modelspec.sai_model_spec": MODELSPEC_VERSION,
            "modelspec.architecture": MODELSPEC_ARCHITECTURE,
            "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
            "modelspec.title": title,
            "modelspec.resolution": MODELSPEC_RESOLUTION,
            "modelspec.date": datetime.datetime.fromtimestamp(now).replace(microsecond=0).isoformat(),
        }
    )
    for key in ("author", "description", "license", "tags"):
        value = getattr(args, f"metadata_{key}")
        if value is not None:
            metadata[f"modelspec.{key}"] = value
    if args.min_timestep is not None or args.max_timestep is not None:
        low = 0 if args.min_timestep is None else args.min_timestep
        high = 1000 if args.max_timestep is None else args.max_timestep
        metadata["modelspec.timestep_range"] = f"{low},{high}"
    return metadata


# ---- resume position -----------------------------------------------------------------------------------------------


@dataclass
class TrainerState:
    """Where training stands, saved next to accelerate's state so `--resume` continues from it."""

    global_step: int = 0
    epoch: int = 0  # 1-based number of the epoch in progress (or just finished); 0 before training
    steps_in_epoch: int = 0  # batches this process has consumed in that epoch
    epoch_finished: bool = False  # its end-of-epoch saves and samples are done too
    epoch_order: list = field(default_factory=list)  # the epoch's batches: [dataset index, latent cache files]
    sampler_generator_state: list[int] | None = None  # accelerate's synchronized sampler generator (multi-process)
    losses: list[float] = field(default_factory=list)  # the loss recorder's window

    def save(self, folder: str) -> None:
        with open(os.path.join(folder, TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, folder: str) -> TrainerState | None:
        path = os.path.join(folder, TRAINER_STATE_FILE)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))


# ---- writing -------------------------------------------------------------------------------------------------------


def prepare_output_dir(folder: str) -> None:
    """Create --output_dir at the start of the run, and remove what a killed save left in it: `<name>-state.tmp`
    folders and `<file>.safetensors.tmp<pid>` files of processes that no longer run."""
    os.makedirs(folder, exist_ok=True)
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.endswith(STATE_SUFFIX + TEMPORARY_STATE_SUFFIX) and os.path.isdir(path):
            shutil.rmtree(path)
            logger.info(f"removed {path}, left by an interrupted save")
    remove_leftover_temporary_files(folder)


STOPPED_BEFORE_TRAINING = "training stopped before its first step; nothing was saved"


class Saver:
    """Saves LoRAs and states (main process only, states from every process), prunes old ones, uploads."""

    def __init__(self, args: argparse.Namespace, accelerator, network, base_metadata: dict[str, str]):
        self.args, self.accelerator, self.network = args, accelerator, network
        self.base_metadata = base_metadata
        self.uploads: list[threading.Thread] = []
        self.last_state: str | None = None  # the newest complete state folder of this run
        self.last_lora: str | None = None
        self.state_in_progress: str | None = None  # the temporary folder of a state being written

    def resume_hint(self) -> str:
        """What an interrupted run leaves and how to continue it."""
        if self.last_state is not None and os.path.isdir(self.last_state):
            return f"training stopped; continue it with --resume {self.last_state} (the last saved state)"
        saved = f" (last LoRA saved: {self.last_lora})" if self.last_lora else ""
        return (
            f"training stopped{saved}; no training state was saved, so a new run starts over: add --save_state "
            "(with --save_every_n_steps N) to be able to --resume"
        )

    def remove_partial_saves(self) -> None:
        """Delete what this process was writing in --output_dir (the interrupt watchdog's cleanup): its
        `*.safetensors.tmp<pid>` files and the `*-state.tmp` folder of a state save in progress."""
        remove_temporary_files(self.args.output_dir)
        tmp = self.state_in_progress
        if tmp is not None and self.accelerator.is_main_process:
            for _ in range(3):  # the main thread may still be adding files to it
                shutil.rmtree(tmp, ignore_errors=True)
                if not os.path.exists(tmp):
                    break

    def _path(self, name: str) -> str:
        return os.path.join(self.args.output_dir, name)

    def save_lora(self, name: str, steps: int, epoch: int, final: bool = False) -> None:
        if not self.accelerator.is_main_process:
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        path = self._path(name + ".safetensors")
        logger.info(f"saving LoRA: {path}")
        metadata = save_metadata(self.args, self.base_metadata, steps, epoch)
        self.accelerator.unwrap_model(self.network).save_weights(path, SAVE_DTYPE, metadata)
        self.last_lora = path
        self.upload(path, force_sync=final)
        if self.args.save_diffusers_lora:
            exported = self._path(name + DIFFUSERS_SUFFIX + ".safetensors")
            logger.info(f"saving the diffusers/PEFT export: {exported}")
            export_lora_file(*load_lora_file(path), exported)  # from the saved file: the very tensors users get
            self.upload(exported, force_sync=final)

    def save_state(self, name: str, trainer_state: TrainerState) -> None:
        """accelerate's state (network weights, optimizer, scheduler, every process's RNG) plus the resume position,
        written under a temporary name and renamed when complete. Every process must call this."""
        final = self._path(name + STATE_SUFFIX)
        tmp = final + TEMPORARY_STATE_SUFFIX
        acc = self.accelerator
        if acc.is_main_process:
            os.makedirs(self.args.output_dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        logger.info(f"saving state: {final}")
        self.state_in_progress = tmp
        try:
            acc.save_state(tmp)
            acc.wait_for_everyone()
            if acc.is_main_process:
                trainer_state.save(tmp)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
        except BaseException:  # Ctrl-C or a failed write: no half-written state stays behind
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self.state_in_progress = None
        self.last_state = final
        if acc.is_main_process and self.args.save_state_to_huggingface:
            self.upload(final)
        acc.wait_for_everyone()

    def remove_lora(self, name: str) -> None:
        for path in (self._path(name + ".safetensors"), self._path(name + DIFFUSERS_SUFFIX + ".safetensors")):
            if self.accelerator.is_main_process and os.path.exists(path):
                logger.info(f"removing old LoRA: {path}")
                os.remove(path)

    def remove_state(self, name: str) -> None:
        path = self._path(name + STATE_SUFFIX)
        if self.accelerator.is_main_process and os.path.exists(path):
            logger.info(f"removing old state: {path}")
            shutil.rmtree(path)

    def upload(self, path: str, force_sync: bool = False) -> None:
        """Upload to --huggingface_repo_id (if set); failures are logged, never raised."""
        args = self.args
        if not args.huggingface_repo_id:
            return
        if args.async_upload and not force_sync:
            thread = threading.Thread(target=upload_to_hub, args=(args, path), daemon=False)
            thread.start()
            self.uploads.append(thread)
        else:
            upload_to_hub(args, path)

    def wait_for_uploads(self) -> None:
        for thread in self.uploads:
            thread.join()


def upload_to_hub(args: argparse.Namespace, path: str) -> None:
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=args.huggingface_token)
        repo_type = args.huggingface_repo_type or "model"
        api.create_repo(
            args.huggingface_repo_id,
            repo_type=repo_type,
            private=args.huggingface_repo_visibility != "public",
            exist_ok=True,
        )
        target = "/".join(p for p in (args.huggingface_path_in_repo, os.path.basename(path)) if p)
        if os.path.isdir(path):
            api.upload_folder(
                repo_id=args.huggingface_repo_id, folder_path=path, path_in_repo=target, repo_type=repo_type
            )
        else:
            api.upload_file(
                repo_id=args.huggingface_repo_id, path_or_fileobj=path, path_in_repo=target, repo_type=repo_type
            )
        logger.info(f"uploaded {path} to {args.huggingface_repo_id}/{target}")
    except Exception as e:  # an upload must never stop training
        logger.error(f"upload of {path} to {args.huggingface_repo_id} failed: {e}")


def download_state_from_hub(args: argparse.Namespace) -> str:
    """--resume_from_huggingface: `repo_owner/repo_name/path[:revision[:repo_type]]` -> a local state folder."""
    from huggingface_hub import snapshot_download

    owner, repo, *rest = args.resume.split("/")
    path_in_repo = "/".join(rest)
    revision = repo_type = None
    if ":" in path_in_repo:
        parts = path_in_repo.split(":")
        path_in_repo, revision = parts[0], parts[1]
        repo_type = parts[2] if len(parts) > 2 else "model"
    local = snapshot_download(
        f"{owner}/{repo}",
        revision=revision,
        repo_type=repo_type,
        token=args.huggingface_token,
        allow_patterns=[f"{path_in_repo}/*"] if path_in_repo else None,
    )
    folder = os.path.join(local, path_in_repo)
    if not os.path.isdir(folder) or not os.listdir(folder):
        raise UsageError(f"--resume {args.resume}: no files found on the Hub")
    return folder
