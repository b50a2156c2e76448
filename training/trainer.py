"""FramePack LoRA training: musubi-tuner's setup sequence and training loop.

Random draws follow musubi-tuner: `set_seed(--seed)`, the dataset shuffle seed, the LoRA
initialisation in module order, the DataLoader permutation, then per step `randn_like(latents)` noise in the cache
dtype and the timestep draw. Loading sample-prompt encoders and sampling draw nothing from the run's generators.

Fixed musubi-tuner defects: the empty --optimizer_type means AdamW; schedule-free optimizers get a working
scheduler; --dim_from_weights builds the network from the file's ranks and alphas; the metadata key is
ss_session_id; --output_name has a default; loaded --network_weights set the runtime scale from their alpha;
one-frame samples work with 2x/4x clean latents. --resume continues the epoch, the step and the data order where
the state was saved, so an interrupted run resumed from its last state ends with the same LoRA as an uninterrupted
one. In several processes only the main process samples and saves, and each process draws its own noise.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import random
import threading
import time
from datetime import timedelta

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import DynamoBackend, TorchDynamoPlugin, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from frame_pack.sections import CLEAN_2X_FRAMES, CLEAN_4X_FRAMES
from pipelines.flags import compile_settings
from training import checkpoints as C
from training.args import ATTENTION_FLAGS, attention_mode, base_weight_multipliers, parse_args
from training.data import build_dataloader
from training.optim import create_lr_scheduler, create_optimizer
from training.preflight import check_training_files
from training.rng import preserved_rng
from training.timesteps import fixed_timestep_input, loss_weighting, noisy_model_input_and_timesteps, show_timesteps
from training.tracking import LossRecorder, init_trackers, logging_directory, resolve_trackers, step_logs
from training.validation import Validator, load_datasets
from utils.cli import UsageError, entry_point, on_forced_interrupt, one_line
from utils.distributed import cpu_only_group, launched_processes, process_group_backend

logger = logging.getLogger(__name__)

SEED_MAX = 2**32 - 1  # numpy seeds (accelerate's set_seed) must stay below 2**32
MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def model_inputs(
    batch: dict, noisy: torch.Tensor, timesteps: torch.Tensor, guidance_scale: float, device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """DiT keyword arguments of a cached batch. 2x/4x clean latents: the cached ones, or zeros when only
    their indices were cached (one-frame caches), or nothing when the indices are absent (--one_frame_no_2x/4x).
    Floating tensors are cast to `dtype` (float32 under autocast, the DiT dtype without)."""
    latents = batch["latents"]
    b, c, _, h, w = latents.shape
    inputs = {
        "hidden_states": noisy,
        "timestep": timesteps,
        "encoder_hidden_states": batch["llama_vec"],
        "encoder_attention_mask": batch["llama_attention_mask"],
        "pooled_projections": batch["clip_l_pooler"],
        "guidance": torch.tensor([guidance_scale * 1000.0] * b),
        "latent_indices": batch["latent_indices"],
        "clean_latents": batch["latents_clean"],
        "clean_latent_indices": batch["clean_latent_indices"],
        "image_embeddings": batch["image_embeddings"],
    }
    for scale, frames in (("2x", CLEAN_2X_FRAMES), ("4x", CLEAN_4X_FRAMES)):
        indices = batch.get(f"clean_latent_{scale}_indices")
        if indices is None:
            continue
        clean = batch.get(f"latents_clean_{scale}")
        if clean is None:
            clean = torch.zeros((b, c, frames, h, w), dtype=latents.dtype)
        inputs[f"clean_latent_{scale}_indices"] = indices
        inputs[f"clean_latents_{scale}"] = clean
    out = {}
    for key, value in inputs.items():
        if value.is_floating_point() and key not in ("timestep", "guidance"):
            value = value.to(dtype)
        out[key] = value.to(device)
    return out


def create_accelerator(args: argparse.Namespace) -> Accelerator:
    """accelerate with the run's precision, accumulation, trackers, dynamo and DDP settings. Several processes
    without CUDA (torchrun on CPUs) use gloo."""
    logging_dir = logging_directory(args)
    log_with = resolve_trackers(args, logging_dir)
    handlers = []
    if launched_processes() > 1:
        timeout = timedelta(minutes=args.ddp_timeout) if args.ddp_timeout else None
        handlers.append(InitProcessGroupKwargs(backend=process_group_backend(), timeout=timeout))
    if args.ddp_gradient_as_bucket_view or args.ddp_static_graph:
        handlers.append(
            DistributedDataParallelKwargs(
                gradient_as_bucket_view=args.ddp_gradient_as_bucket_view, static_graph=args.ddp_static_graph
            )
        )
    dynamo = None
    if args.dynamo_backend.upper() != "NO":
        dynamo = TorchDynamoPlugin(
            backend=DynamoBackend(args.dynamo_backend.upper()),
            mode=args.dynamo_mode,
            fullgraph=args.dynamo_fullgraph,
            dynamic=args.dynamo_dynamic,
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_dir=logging_dir,
        dynamo_plugin=dynamo,
        kwargs_handlers=handlers,
        cpu=cpu_only_group(),
    )
    logger.info(
        f"accelerator: {accelerator.distributed_type}, {accelerator.num_processes} process(es), "
        f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )
    return accelerator


def epoch_batches(loader, undo_start_draws: bool):
    """The loader's batches; with `undo_start_draws`, random draws made while the iteration starts (worker seeds,
    permutation) are undone, for a resumed epoch whose draws were already made before the state was saved."""
    iterator = iter(loader)
    if undo_start_draws:
        with preserved_rng():
            first = next(iterator, None)
        if first is None:
            return
        yield first
    yield from iterator


def resolved_flags(flags: argparse.Namespace, **derived) -> argparse.Namespace:
    """A copy of the flags with the values derived at start (seed, output name, step count) filled in; the
    caller's namespace stays as given."""
    return argparse.Namespace(**{**vars(flags), **derived})


def load_dit(args: argparse.Namespace, device: torch.device):
    """The DiT in its file dtype (bf16), frozen; base LoRAs merged, then fp8 (both while the checkpoint streams in,
    so the bf16 model is never held beside its fp8 copy), then block swap."""
    from frame_pack.attention import AttentionBackendError, check_attn_mode
    from frame_pack.block_swap import check_blocks_to_swap
    from frame_pack.dit_loader import dit_skeleton, load_packed_model
    from frame_pack.fp8 import Fp8Settings

    mode = attention_mode(args)
    if mode != "torch":
        try:
            check_attn_mode(mode)
        except AttentionBackendError as e:
            flag = next(f for f, m in ATTENTION_FLAGS.items() if m == mode)
            raise UsageError(f"--{flag}: {e}; use --sdpa") from None
    skeleton = dit_skeleton(args.dit)
    swap = args.blocks_to_swap or 0
    if swap and device.type != "cpu":  # on the CPU block swap is a no-op (enable_block_swap warns)
        num_double, num_single = len(skeleton.transformer_blocks), len(skeleton.single_transformer_blocks)
        check_blocks_to_swap(swap, num_double, num_single, training=True)
    merge = None
    if args.base_weights:
        from networks.lora_merge import plan_lora_merge

        dtype = MIXED_PRECISION_DTYPES[args.mixed_precision]
        merge = plan_lora_merge(
            skeleton, args.base_weights, base_weight_multipliers(args), dtype=dtype, flag="--base_weights"
        )
    fp8 = Fp8Settings(scaled=args.fp8_scaled) if args.fp8_base else None  # before the LoRA takes over the forwards
    dit = load_packed_model(
        args.dit, "cpu", attn_mode=mode, split_attn=args.split_attn, weight_transform=merge, fp8=fp8
    )
    dit.eval().requires_grad_(False)
    if swap:
        pinned = args.use_pinned_memory_for_block_swap
        dit.enable_block_swap(swap, device, supports_backward=True, use_pinned_memory=pinned)
    dit.move_to_device_except_swap_blocks(device)
    return dit


def read_weights(path: str) -> dict:
    """A LoRA file's tensors; the file was checked to be a LoRA before anything loaded (training.preflight)."""
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_network_weights(network, path: str) -> None:
    """--network_weights into the network: every module of the file must be one of the network's, with its shapes
    (ranks were compared before loading; this catches a LoRA of a DiT of another width)."""
    try:
        info = network.load_weights(path)
    except RuntimeError as e:  # load_state_dict's size mismatch
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), one_line(e))
        raise UsageError(f"--network_weights {path}: not a LoRA of this network: {first}") from None
    unexpected = [key for key in info.unexpected_keys if not key.endswith(".alpha")]
    if unexpected:
        raise UsageError(
            f"--network_weights {path}: not a LoRA of this network: {len(unexpected)} tensor(s) for modules it "
            f"does not have, e.g. {unexpected[0]} (check --network_args include_patterns/exclude_patterns)"
        )
    loaded = len(network.state_dict()) - len(info.missing_keys)
    logger.info(f"loaded network weights from {path}: {loaded} tensors, {len(info.missing_keys)} left at their init")


def create_network(args: argparse.Namespace, dit):
    """The LoRA network of --network_module applied to the DiT, with --network_weights loaded if given."""
    module = importlib.import_module(args.network_module)
    kwargs = dict(item.partition("=")[::2] for item in args.network_args or [])
    if args.dim_from_weights:
        network = module.create_arch_network_from_weights(1.0, read_weights(args.network_weights), unet=dit)
        rank_dropout, module_dropout = kwargs.get("rank_dropout"), kwargs.get("module_dropout")
        for lora in network.unet_loras:
            lora.dropout = args.network_dropout
            lora.rank_dropout = None if rank_dropout is None else float(rank_dropout)
            lora.module_dropout = None if module_dropout is None else float(module_dropout)
        if kwargs.get("loraplus_lr_ratio") is not None:
            network.set_loraplus_lr_ratio(float(kwargs["loraplus_lr_ratio"]))
    else:
        create = getattr(module, "create_arch_network", None) or module.create_network
        network = create(
            1.0,
            args.network_dim,
            args.network_alpha,
            None,
            None,
            dit,
            neuron_dropout=args.network_dropout,
            **kwargs,
        )
    if hasattr(network, "prepare_network"):
        network.prepare_network(args)
    network.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
    if args.network_weights:
        load_network_weights(network, args.network_weights)
    return network


class Trainer:
    """A training run: `__init__` builds everything in the setup order that fixes the random draws (seed, dataset
    shuffle seed, LoRA initialisation, then the data order); `train()` runs the loop."""

    def __init__(self, flags: argparse.Namespace):
        self.session_id = random.randint(0, SEED_MAX)
        self.started_at = time.time()
        seed = flags.seed if flags.seed is not None else random.randint(0, SEED_MAX)
        set_seed(seed)

        self.group, validation = load_datasets(flags)
        group = self.group
        output_name = flags.output_name
        if output_name is None:
            output_name = os.path.splitext(os.path.basename(flags.dataset_config))[0]
            logger.info(f"--output_name not given: saving as {output_name}")
        self.accelerator = acc = create_accelerator(flags)
        if acc.is_main_process:
            C.prepare_output_dir(flags.output_dir)
        loader, self.sampler = build_dataloader(
            group, flags.max_data_loader_n_workers, flags.persistent_data_loader_workers, acc.num_processes
        )
        max_train_steps = flags.max_train_steps
        if flags.max_train_epochs is not None:
            per_epoch = math.ceil(len(loader) / acc.num_processes / flags.gradient_accumulation_steps)
            max_train_steps = flags.max_train_epochs * per_epoch
            logger.info(f"{flags.max_train_epochs} epochs: {max_train_steps} steps")
        self.args = args = resolved_flags(flags, seed=seed, output_name=output_name, max_train_steps=max_train_steps)
        scheduled = args.validate_every_n_steps or args.validate_every_n_epochs
        self.validator = Validator(validation, args.validation_timesteps, seed) if scheduled else None
        self.validated_at: int | None = None
        self.validation_mean: float | None = None

        self.samples = None
        if args.sample_prompts and acc.is_main_process:
            from training.sample_prompts import SampleGenerator

            self.samples = SampleGenerator(args, acc.device)

        with preserved_rng():  # loading draws nothing in a seeded run; keep it that way
            dit = load_dit(args, acc.device)
        network = create_network(args, dit)
        if args.gradient_checkpointing:
            dit.enable_gradient_checkpointing(cpu_offload=args.gradient_checkpointing_cpu_offload)
            network.enable_gradient_checkpointing()
        self.dit_dtype = dit.x_embedder.proj.weight.dtype

        params, self.lr_descriptions = network.prepare_optimizer_params(unet_lr=args.learning_rate)
        self.optimizer_info = create_optimizer(args, params)
        info = self.optimizer_info
        self.args = args = resolved_flags(args, learning_rate=info.learning_rate, lr_scheduler=info.lr_scheduler)
        group.set_max_train_steps(args.max_train_steps)
        lr_scheduler = create_lr_scheduler(args, self.optimizer_info, acc.num_processes)

        swap = bool(args.blocks_to_swap) and dit.block_swap is not None
        # frozen: no DDP wrapper (accelerate would add one on CPU processes), but autocast, placement and dynamo
        self.dit = acc.prepare_model(dit, device_placement=not swap, evaluation_mode=True)
        compile_with = compile_settings(args)
        if compile_with is not None:  # after the LoRA took over the Linear forwards, so they are compiled too
            from frame_pack.compile import compile_blocks

            compile_blocks(acc.unwrap_model(self.dit), compile_with)
        self.dit.train(args.gradient_checkpointing)
        prepared = acc.prepare(network, self.optimizer_info.optimizer, loader, lr_scheduler)
        self.network, self.optimizer, self.loader, self.lr_scheduler = prepared
        self.network_module = acc.unwrap_model(self.network)
        self.network_module.prepare_grad_etc(self.dit)
        self.register_state_hooks()

        self.state = C.TrainerState()
        if args.resume:
            self.state = self.resumed_state()
        elif acc.num_processes > 1:
            set_seed(args.seed, device_specific=True)  # each process draws its own noise and timesteps

        self.steps_per_epoch = math.ceil(len(self.loader) / args.gradient_accumulation_steps)
        self.num_epochs = math.ceil(args.max_train_steps / self.steps_per_epoch)
        self.metadata = C.training_metadata(
            args,
            session_id=self.session_id,
            started_at=self.started_at,
            num_train_items=group.num_train_items,
            num_batches_per_epoch=len(self.loader),
            num_epochs=self.num_epochs,
            optimizer_name=self.optimizer_info.name,
            optimizer_args=self.optimizer_info.args,
            datasets=[d.get_metadata() for d in group.datasets],
        )
        self.saver = C.Saver(args, acc, self.network, self.metadata)
        if acc.is_main_process and acc.log_with:
            init_trackers(acc, args)

    def register_state_hooks(self) -> None:
        """accelerate states hold the network only (not the frozen DiT, which accelerate also tracks)."""
        acc, network = self.accelerator, self.network_module

        def is_network(model) -> bool:
            return acc.unwrap_model(model) is network

        def save_hook(models, weights, output_dir):
            for i in reversed(range(len(models))):
                if not is_network(models[i]) and i < len(weights):
                    weights.pop(i)

        def load_hook(models, input_dir):
            for i in reversed(range(len(models))):
                if not is_network(models[i]):
                    models.pop(i)

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    def resumed_state(self) -> C.TrainerState:
        """Load the accelerate state of --resume; the trainer state saved with it (a fresh one if absent)."""
        args, acc = self.args, self.accelerator
        folder = C.download_state_from_hub(args) if args.resume_from_huggingface else args.resume
        logger.info(f"resuming from {folder}")
        try:
            acc.load_state(folder)
        except RuntimeError as e:  # the saved network's modules or shapes are not this run's
            raise UsageError(f"--resume {folder}: not a training state of this network ({one_line(e)[:300]})") from None
        state = C.TrainerState.load(folder)
        if state is None:
            logger.warning(f"{folder} has no {C.TRAINER_STATE_FILE} (not saved by this trainer): starting at step 0")
            return C.TrainerState()
        if state.steps_in_epoch and not self.sampler.knows(state.epoch_order):
            logger.warning("the dataset changed since the state was saved: the interrupted epoch starts over")
            state.steps_in_epoch, state.epoch_finished = 0, False
        if state.sampler_generator_state is not None and self.sampler.generator is not None:
            self.sampler.generator.set_state(torch.tensor(state.sampler_generator_state, dtype=torch.uint8))
        logger.info(f"resuming at epoch {state.epoch}, step {state.global_step}")
        return state

    # ---- the step ------------------------------------------------------------------------------------------------

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, timesteps) of a training batch: fresh noise and timesteps from the run's generators."""
        args, device = self.args, self.accelerator.device
        latents = batch["latents"].to(device)
        noise = torch.randn_like(latents)
        noisy, timesteps = noisy_model_input_and_timesteps(args, noise, latents, device, self.dit_dtype)
        weighting = loss_weighting(args.weighting_scheme, timesteps, device, self.dit_dtype)
        return self.flow_matching_loss(batch, latents, noise, noisy, timesteps, weighting).mean(), timesteps

    def flow_matching_loss(self, batch, latents, noise, noisy, timesteps, weighting=None) -> torch.Tensor:
        """Element-wise squared error of the DiT's prediction against the velocity target noise − latents."""
        acc, device = self.accelerator, self.accelerator.device
        input_dtype = torch.float32 if acc.mixed_precision != "no" else self.dit_dtype
        inputs = model_inputs(batch, noisy, timesteps, self.args.guidance_scale, device, input_dtype)
        with acc.autocast():
            model_pred = self.dit(**inputs)
        target = noise.float() - latents.float()
        loss = F.mse_loss(model_pred.float(), target, reduction="none")
        return loss if weighting is None else loss * weighting

    def validation_loss(self, batch: dict, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        """Mean loss of a validation batch at one timestep with its fixed noise (no loss weighting)."""
        device = self.accelerator.device
        latents, noise = batch["latents"].to(device), noise.to(device)
        noisy, timesteps = fixed_timestep_input(noise, latents, timestep)
        return self.flow_matching_loss(batch, latents, noise, noisy, timesteps).mean()

    def validate(self, global_step: int, epoch: int | None = None) -> None:
        """The validation loss, when one is due at this step (or at the end of this epoch) and not yet computed."""
        if self.validator is None or self.validated_at == global_step:
            return
        args = self.args
        due_by_steps = args.validate_every_n_steps and global_step % args.validate_every_n_steps == 0
        due_by_epochs = epoch is not None and args.validate_every_n_epochs and epoch % args.validate_every_n_epochs == 0
        if not (global_step == 0 or due_by_steps or due_by_epochs):
            return
        result = self.validator.run(self.validation_loss, [self.dit, self.network])
        self.validated_at, self.validation_mean = global_step, result.mean
        logger.info(f"validation loss at step {global_step}: {result.summary()}")
        if self.accelerator.log_with:
            self.accelerator.log(result.logs(), step=global_step)

    def sync_and_clip_gradients(self) -> None:
        """The network is not called through DDP, so gradients are averaged here; then clipped."""
        acc, params = self.accelerator, list(self.network.parameters())
        if acc.num_processes > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad /= acc.num_processes
        if self.args.max_grad_norm != 0.0:
            acc.clip_grad_norm_(params, self.args.max_grad_norm)

    # ---- saving and sampling -------------------------------------------------------------------------------------

    def trainer_state(
        self, epoch: int, steps_in_epoch: int, global_step: int, losses: list[float], finished: bool = False
    ) -> C.TrainerState:
        generator = self.sampler.generator
        return C.TrainerState(
            global_step=global_step,
            epoch=epoch,
            steps_in_epoch=steps_in_epoch,
            epoch_finished=finished,
            epoch_order=list(self.sampler.order),
            sampler_generator_state=generator.get_state().tolist() if generator is not None else None,
            losses=list(losses),
        )

    def sample(self, epoch: int | None, steps: int) -> None:
        from training.sample_prompts import should_sample

        if not should_sample(self.args, steps, epoch):
            return
        acc = self.accelerator
        self.optimizer_info.eval()
        if self.samples is not None:
            logger.info(f"sampling at step {steps}")
            self.samples.sample(acc.unwrap_model(self.dit), self.network_module, epoch, steps)
        acc.wait_for_everyone()
        self.optimizer_info.train()

    def _save_and_prune(self, plan: C.SavePlan, global_step: int, epoch: int, state: C.TrainerState) -> None:
        """Save the LoRA (and state) under `plan.name`, then drop the save(s) that fell out of the keep window."""
        saver = self.saver
        saver.save_lora(plan.name, global_step, epoch)
        if self.args.save_state:
            saver.save_state(plan.name, state)
        if plan.old_lora is not None:
            saver.remove_lora(plan.old_lora)
        if self.args.save_state and plan.old_state is not None:
            saver.remove_state(plan.old_state)

    def save_at_step(self, global_step: int, epoch0: int, state: C.TrainerState) -> None:
        a = self.args
        plan = C.step_save_plan(
            a.output_name, global_step, a.save_every_n_steps, a.save_last_n_steps, a.save_last_n_steps_state
        )
        self.optimizer_info.eval()
        self._save_and_prune(plan, global_step, epoch0, state)
        self.optimizer_info.train()

    def save_at_epoch(self, epoch: int, global_step: int, state: C.TrainerState) -> None:
        a = self.args
        plan = C.epoch_save_plan(
            a.output_name, epoch, a.save_every_n_epochs, a.save_last_n_epochs, a.save_last_n_epochs_state
        )
        self._save_and_prune(plan, global_step, epoch, state)

    # ---- the loop ------------------------------------------------------------------------------------------------

    def step(self, batch: dict) -> tuple[float, tuple | None, list[float]]:
        """One micro-batch: loss, backward, (on sync) gradient averaging and clipping, optimizer and scheduler step,
        then max-norm regularisation. Returns (loss, max-norm stats or None, the batch's timesteps)."""
        args, acc = self.args, self.accelerator
        with acc.accumulate(self.network):
            self.network_module.on_step_start()
            loss, timesteps = self.loss(batch)
            acc.backward(loss)
            if acc.sync_gradients:
                self.sync_and_clip_gradients()
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        max_norm = None
        if args.scale_weight_norms:
            max_norm = self.network_module.apply_max_norm_regularization(args.scale_weight_norms, acc.device)
        return loss.detach().item(), max_norm, timesteps.float().tolist()

    def epoch_start(self, epoch: int, global_step: int) -> tuple:
        """(batches, batches already consumed) of an epoch; a resumed epoch continues where its state was saved."""
        state, acc = self.state, self.accelerator
        self.sampler.epoch = epoch
        self.network_module.on_epoch_start(self.dit)
        if not self.resumes_in(epoch):
            return epoch_batches(self.loader, undo_start_draws=False), 0
        self.sampler.resume_epoch(epoch, state.epoch_order, state.steps_in_epoch * acc.num_processes)
        if global_step >= self.args.max_train_steps:
            return [], state.steps_in_epoch
        return epoch_batches(self.loader, undo_start_draws=True), state.steps_in_epoch

    def resumes_in(self, epoch: int) -> bool:
        state = self.state
        return epoch == state.epoch and not state.epoch_finished and state.steps_in_epoch > 0

    def end_epoch(self, epoch: int, global_step: int, recorder: LossRecorder) -> None:
        args, acc = self.args, self.accelerator
        if acc.log_with:
            acc.log({"loss/epoch": recorder.moving_average}, step=epoch)
        acc.wait_for_everyone()
        self.optimizer_info.eval()
        every = args.save_every_n_epochs
        if every is not None and epoch % every == 0 and epoch < self.num_epochs:
            saved = self.trainer_state(epoch, len(self.loader), global_step, recorder.losses, finished=True)
            self.save_at_epoch(epoch, global_step, saved)
        self.sample(epoch, global_step)
        self.validate(global_step, epoch)
        self.optimizer_info.train()

    def train(self) -> None:
        args, acc, state = self.args, self.accelerator, self.state
        global_step = state.global_step
        recorder = LossRecorder()
        recorder.losses, recorder.total = list(state.losses), sum(state.losses)
        start_epoch = state.epoch if state.epoch_finished or state.epoch == 0 else state.epoch - 1
        logger.info(
            f"training: {self.group.num_train_items} items, {len(self.loader)} batches per epoch per process, "
            f"{self.num_epochs} epochs, {args.max_train_steps} steps, gradient accumulation "
            f"{args.gradient_accumulation_steps}"
        )
        progress = tqdm(
            total=args.max_train_steps, initial=global_step, disable=not acc.is_local_main_process, desc="steps"
        )
        if global_step == 0:
            self.sample(0, 0)
            self.validate(0)  # the baseline, before any training

        for epoch0 in range(start_epoch, self.num_epochs):
            epoch = epoch0 + 1
            if global_step >= args.max_train_steps and not self.resumes_in(epoch):
                break
            acc.print(f"\nepoch {epoch}/{self.num_epochs}")
            batches, steps_in_epoch = self.epoch_start(epoch, global_step)
            for batch in batches:
                start = time.perf_counter()
                loss, max_norm, timesteps = self.step(batch)
                seconds = time.perf_counter() - start
                recorder.add(epoch0, steps_in_epoch, loss)
                steps_in_epoch += 1
                if acc.sync_gradients:
                    progress.update(1)
                    global_step += 1
                    self.sample(None, global_step)
                    if args.save_every_n_steps is not None and global_step % args.save_every_n_steps == 0:
                        saved = self.trainer_state(epoch, steps_in_epoch, global_step, recorder.losses)
                        self.save_at_step(global_step, epoch0, saved)
                    self.validate(global_step)

                postfix = {"avr_loss": recorder.moving_average}
                if self.validation_mean is not None:
                    postfix["val_loss"] = self.validation_mean
                if max_norm is not None:
                    postfix.update(keys_scaled=max_norm[0], average_key_norm=max_norm[1])
                progress.set_postfix(postfix)
                if acc.log_with:
                    lrs = self.lr_scheduler.get_last_lr()
                    logs = step_logs(
                        loss,
                        recorder.moving_average,
                        lrs,
                        self.lr_descriptions,
                        self.optimizer_info.optimizer,
                        args.optimizer_type,
                        max_norm,
                        seconds,
                        timesteps,
                    )
                    acc.log(logs, step=global_step)
                if global_step >= args.max_train_steps:
                    break
            self.end_epoch(epoch, global_step, recorder)

        progress.close()
        self.optimizer_info.eval()
        if args.save_state or args.save_state_on_train_end:
            final = self.trainer_state(self.num_epochs, len(self.loader), global_step, recorder.losses, finished=True)
            self.saver.save_state(args.output_name, final)
        self.saver.save_lora(args.output_name, global_step, self.num_epochs, final=True)
        self.saver.wait_for_uploads()
        acc.wait_for_everyone()
        acc.end_training()
        logger.info("training finished")


@entry_point
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.show_timesteps:
        show_timesteps(args)
        return 0
    check_training_files(args)
    trainer: Trainer | None = None
    told = threading.Lock()

    def tell_how_to_resume() -> None:
        """Once, whichever path ends the run: the KeyboardInterrupt below or the interrupt watchdog."""
        if told.acquire(blocking=False):
            logger.warning(trainer.saver.resume_hint() if trainer is not None else C.STOPPED_BEFORE_TRAINING)

    def stop_cleanly() -> None:  # the interrupt watchdog's cleanup, when a Ctrl-C did not end the run in time
        if trainer is not None:
            trainer.saver.remove_partial_saves()
        tell_how_to_resume()

    on_forced_interrupt(stop_cleanly)
    try:
        trainer = Trainer(args)
        trainer.train()
    except KeyboardInterrupt:
        tell_how_to_resume()
        raise
    return 0
