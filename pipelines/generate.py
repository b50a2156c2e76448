"""fpack_generate_video.py: FramePack image-to-video generation, batch and interactive modes, decode-only mode.

One generation: encode the section prompts (LLaMA + CLIP) and images (SigLIP + VAE), then sample the sections in
generation order (inverted anti-drifting: video end first; F1: video start first), then decode and save.
Random draws follow musubi-tuner: one CPU generator seeded with the seed, one noise draw per section.
With --extend_video the sections continue an existing video (``frame_pack.extend``) instead of a start image.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import torch
from tqdm.auto import tqdm

from dataset.buckets import bucket_for_area, resize_image_to_bucket
from dataset.media import load_image
from frame_pack import sections as S
from frame_pack.extend import F1Extension, OriginalExtension, noise_draws_to_skip, resolve_context_frames
from frame_pack.magcache import format_ratios
from frame_pack.sampling import flow_match_x0_model, initial_noise, make_generator, sample_flow
from frame_pack.step_cache import step_cache_on
from frame_pack.timed_prompts import blend_schedule, blend_text_conditioning, is_timed_prompt, section_prompts
from hunyuan_model.frame_math import latent_size
from hunyuan_model.latent_preview import preview_path, write_preview
from networks.lora_switch import LoraSet, lora_set
from pipelines.extend_input import ExtendSource, ExtendVideoError, frames_to_pixels, read_extend_source
from pipelines.flags import compile_settings, step_cache_settings
from pipelines.generate_args import apply_prompt_line, build_parser, line_flag, parse_prompt_line, validate_args
from pipelines.latent_file import latent_metadata, load_latent, save_latent
from pipelines.models import ModelCache, dit_dtype, model_loras
from pipelines.preflight import check_images_readable, check_loras_fit, check_model_files, prepare_save_path
from pipelines.prompt_line import PromptLineError, read_prompt_file
from pipelines.run_metadata import (
    FRAMES_KEY,
    MetadataError,
    apply_settings,
    command_line,
    explicit_dests,
    finished_outputs,
    generation_settings,
    job_key,
    read_settings,
    recorded_flags,
    required_kinds,
    settings_to_metadata,
)
from pipelines.settings import GenerationSettings, ModelSettings, lora_multipliers
from utils.cli import entry_point, on_forced_interrupt, set_interrupt_watchdog_armed
from utils.distributed import SINGLE_PROCESS, Processes, launched_processes, launched_rank, start_processes
from utils.temporary_files import remove_temporary_files, temporary_path
from utils.video_io import save_images, save_video, to_uint8_frames

logger = logging.getLogger(__name__)

SEED_MAX = 2**32 - 1


# ---- inputs ------------------------------------------------------------------------------------------------------


@dataclass
class SectionImage:
    pixels: np.ndarray  # (H, W, 3) uint8, resized and cropped to the video size
    alpha: np.ndarray | None  # (H, W) uint8 when the file had transparency
    latent: torch.Tensor | None = None  # (1, 16, 1, h, w) fp32 on the CPU
    embedding: torch.Tensor | None = None  # (1, 729, hidden) SigLIP last hidden state on the CPU


@dataclass
class PreparedInputs:
    height: int
    width: int
    prompts: list[str]  # per section in time order (one entry in one-frame mode)
    text: dict[str, dict[str, torch.Tensor]]  # prompt -> DiT text kwargs (CPU)
    negative: dict[str, torch.Tensor] | None
    images: dict[int, SectionImage]
    end_image: SectionImage | None = None
    control_images: list[SectionImage] = field(default_factory=list)
    control_masks: list[np.ndarray | None] = field(default_factory=list)
    extend_latent: torch.Tensor | None = None  # (1, 16, T_in, h, w) fp32: the video --extend_video continues


def read_section_image(path: str, height: int, width: int) -> SectionImage:
    image = load_image(path, keep_alpha=True)
    array = resize_image_to_bucket(image, (width, height))
    if array.shape[-1] == 4:
        return SectionImage(np.ascontiguousarray(array[..., :3]), np.ascontiguousarray(array[..., 3]))
    return SectionImage(array, None)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, 1, H, W) in [-1, 1]: x / 127.5 - 1."""
    return frames_to_pixels(pixels[None])


def read_mask(path: str, height: int, width: int) -> np.ndarray:
    """A mask file resized and cropped exactly like its image (musubi-tuner skipped the crop), grayscale uint8."""
    return resize_image_to_bucket(load_image(path).convert("L"), (width, height))


def text_kwargs(llama_vec, llama_mask, clip_pooler) -> dict[str, torch.Tensor]:
    return {"encoder_hidden_states": llama_vec, "encoder_attention_mask": llama_mask, "pooled_projections": clip_pooler}


def generation_sections(settings: GenerationSettings) -> int:
    """Sections to sample (with --extend_video: the new part only)."""
    return S.total_sections(settings.video_seconds, settings.latent_window_size, settings.video_sections)


def prompts_by_section(settings: GenerationSettings) -> list[str]:
    """Each section's prompt in time order; one-frame mode uses section 0's prompt only."""
    if settings.one_frame and not is_timed_prompt(settings.prompt):
        return [S.parse_section_spec(settings.prompt)[0]]
    sections = 1 if settings.one_frame else generation_sections(settings)
    return section_prompts(settings.prompt, sections, settings.latent_window_size, settings.fps)


def extension_first_frame(source: ExtendSource, models: ModelCache) -> SectionImage:
    """The input's first frame as pixels, for the SigLIP conditioning when no --image_path is given (a latent input
    decodes its first latent frame, which the causal VAE decodes on its own)."""
    if source.frames is not None:
        return SectionImage(source.frames[0], None)
    from hunyuan_model.vae import decode_latents

    with torch.no_grad():
        pixels = decode_latents(models.vae(), source.latent[:, :, :1])[0].cpu()
    models.offload_vae()
    return SectionImage(to_uint8_frames(pixels)[0], None)


def prepare_inputs(
    settings: GenerationSettings, models: ModelCache, seed: int, source: ExtendSource | None = None
) -> PreparedInputs:
    from hunyuan_model.image_encoder import encode_image
    from hunyuan_model.vae import encode_pixels

    height, width = settings.video_size
    one_frame = settings.one_frame
    prompts = prompts_by_section(settings)
    if settings.image_path:
        image_paths = S.parse_section_spec(settings.image_path)
        if one_frame:  # one-frame mode uses section 0's image only
            image_paths = {0: image_paths[0]}
        images = {i: read_section_image(p, height, width) for i, p in image_paths.items()}
    else:  # an extension without --image_path: SigLIP sees the input's first frame
        images = {0: extension_first_frame(source, models)}
    end_image = None
    if settings.end_image_path and not settings.f1 and not one_frame:
        end_image = read_section_image(settings.end_image_path, height, width)
    controls = [read_section_image(p, height, width) for p in settings.control_image_path or []]
    mask_paths = settings.control_image_mask_path or []
    masks = [
        read_mask(mask_paths[i], height, width) if i < len(mask_paths) else controls[i].alpha
        for i in range(len(controls))
    ]

    encoders = models.text_encoders()
    text = {}
    for prompt in dict.fromkeys(prompts):
        logger.info(f"encoding prompt: {prompt!r}")
        text[prompt] = text_kwargs(*encoders.encode(prompt, settings.custom_system_prompt))
    negative = None
    if settings.guidance_scale != 1.0:
        negative = text_kwargs(*encoders.encode(settings.negative_prompt or "", settings.custom_system_prompt))
    image_encoder = models.image_encoder()
    with torch.no_grad():
        for image in images.values():
            image.embedding = encode_image(image.pixels, image_encoder).cpu()
    models.release_encoders()

    vae = models.vae()
    generator = torch.Generator(device=vae.device if vae.device.type == "cuda" else "cpu").manual_seed(seed)
    # An extension starts from the input's latents, so its section images only give SigLIP conditioning.
    start_images = [] if source is not None else list(images.values())
    for image in [*start_images, *([end_image] if end_image else []), *controls]:
        image.latent = encode_pixels(vae, pixels_to_tensor(image.pixels), generator).float().cpu()
    extend_latent = None
    if source is not None:
        extend_latent = source.latent
        if extend_latent is None:
            logger.info(f"VAE-encoding {len(source.frames)} frames of {source.path}")
            extend_latent = encode_pixels(vae, frames_to_pixels(source.frames), generator).float().cpu()
    models.offload_vae()
    return PreparedInputs(height, width, prompts, text, negative, images, end_image, controls, masks, extend_latent)


# ---- sampling ------------------------------------------------------------------------------------------------------


def _to(kwargs: dict, device, dtype) -> dict:
    """Move tensors to `device`; floating ones that the DiT consumes in its dtype are cast (masks stay bool)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and not k.startswith("clean_latents"):
                v = v.to(dtype)
            v = v.to(device)
        out[k] = v
    return out


def sample_section(
    settings: GenerationSettings,
    dit,
    inputs: PreparedInputs,
    text: dict[str, torch.Tensor],
    image: SectionImage,
    shared: dict,
    noise,
    section_caches: list | None = None,
):
    """Sample one DiT section; ``text`` is the positive text conditioning (one prompt's, or a blend). With a step
    cache its per-section report is logged (and the cache kept in `section_caches` when given)."""
    device, dtype = noise.device, dit_dtype(dit)
    shared = _to({"image_embeddings": image.embedding, **shared}, device, dtype)
    positive = _to(text, device, dtype)
    negative = _to(inputs.negative, device, dtype) if inputs.negative is not None else None
    model_x0 = flow_match_x0_model(
        dit,
        positive,
        negative,
        shared=shared,
        embedded_cfg_scale=settings.embedded_cfg_scale,
        guidance_scale=settings.guidance_scale,
        guidance_rescale=settings.guidance_rescale,
        dtype=dtype,
    )
    cache = step_cache_settings(settings).build(
        settings.infer_steps, branches=1 if settings.guidance_scale == 1.0 else 2
    )
    with torch.no_grad(), step_cache_on(dit, cache):
        latent = sample_flow(model_x0, noise, settings.infer_steps, settings.sample_solver).cpu()
    if cache is not None:
        logger.info(f"{cache.name}: {cache.summary()}")
        ratios = cache.calibration_ratios()
        if ratios is not None:
            logger.info(f"MagCache calibrated ratios (for --magcache_mag_ratios): {format_ratios(ratios)}")
        if section_caches is not None:
            section_caches.append(cache)
    return latent


def save_magcache_calibration(caches: list, path: str) -> str | None:
    """Print the calibrated ratios of each section (positive branch) and write them, one line per section."""
    lines = [format_ratios(r) for r in (cache.calibration_ratios() for cache in caches) if r is not None]
    if not lines:
        return None
    print("MagCache calibration; pass one line to --magcache_mag_ratios:")
    for line in lines:
        print(line)
    tmp = temporary_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    logger.info(f"MagCache ratios saved to {path}")
    return path


SectionCallback = Callable[[torch.Tensor], None]


def generate_latent(
    settings: GenerationSettings,
    dit,
    inputs: PreparedInputs,
    seed: int,
    device,
    on_section: SectionCallback | None = None,
    section_caches: list | None = None,
) -> torch.Tensor:
    """Sample every section; returns the time-ordered video latent (1, 16, T, h, w) fp32 on the CPU.

    `on_section` gets the video latent generated so far after each section (e.g. to write a preview); with a step
    cache, each section's cache is appended to `section_caches` when given.
    """
    if settings.one_frame:
        latent = generate_one_frame(settings, dit, inputs, seed, device, section_caches)
        if on_section is not None:
            on_section(latent)
        return latent
    lws = settings.latent_window_size
    n_sections = generation_sections(settings)
    plans = S.plan_sections(
        n_sections, lws, f1=settings.f1, latent_paddings=S.parse_latent_paddings(settings.latent_paddings)
    )
    generator = make_generator(seed)
    context = section_context(settings, inputs)
    mode = "F1 (forward)" if settings.f1 else "inverted anti-drifting"
    if inputs.extend_latent is not None:
        input_frames = inputs.extend_latent.shape[2]
        skipped = noise_draws_to_skip(input_frames, lws)
        for _ in range(skipped):  # the seed's stream continues where a generation of the input's sections left it
            initial_noise(generator, S.section_frames(lws), inputs.height, inputs.width)
        logger.info(
            f"extending {input_frames} latent frames by {n_sections} section(s), {mode}; "
            f"{skipped} noise draw(s) skipped"
        )
    else:
        logger.info(f"{n_sections} section(s), {mode}, {S.video_pixel_frames(n_sections, lws)} frames")
    texts = blend_schedule(inputs.prompts, settings.prompt_blend_sections)
    for plan in tqdm(plans, desc="sections", disable=len(plans) == 1):
        image_key = S.select_section_key(inputs.images, plan.section_index, plan.section_index_from_last)
        image, section_text = inputs.images[image_key], texts[plan.section_index]
        text = inputs.text[section_text.target]
        if section_text.blended:
            previous = inputs.text[section_text.previous]
            text = blend_text_conditioning(previous, text, section_text.weight)
        blend = f" ({section_text.weight:.2f} of it, blended from {section_text.previous!r})"
        logger.info(
            f"section {plan.generation_step + 1}/{n_sections}: video section {plan.section_index}, "
            f"padding {plan.latent_padding}, image #{image_key}, prompt {section_text.target[:60]!r}"
            + (blend if section_text.blended else "")
        )
        noise = initial_noise(generator, S.section_frames(lws), inputs.height, inputs.width).to(device)
        indices, clean = context.section_inputs(plan, image.latent)
        shared = {**indices.batched(1), **clean.as_kwargs()}
        generated = sample_section(settings, dit, inputs, text, image, shared, noise, section_caches)
        context.add(plan, generated, image.latent)
        if on_section is not None:
            on_section(context.video_latent())
    return context.video_latent()


def section_context(settings: GenerationSettings, inputs: PreparedInputs):
    """What the sections are conditioned on: the start image's history, or the video being extended."""
    end_latent = inputs.end_image.latent if inputs.end_image else None
    if inputs.extend_latent is None:
        return S.ImageHistory(inputs.images[0].latent, f1=settings.f1, end_latent=end_latent)
    context_frames = resolve_context_frames(settings.extend_context_frames, settings.f1)
    if settings.f1:
        return F1Extension(inputs.extend_latent, context_frames)
    return OriginalExtension(inputs.extend_latent, settings.latent_window_size, context_frames, end_latent)


def generate_one_frame(
    settings: GenerationSettings, dit, inputs: PreparedInputs, seed: int, device, section_caches=None
) -> torch.Tensor:
    """One-frame inference: one noisy frame at `target_index`, control images as clean latents."""
    options = S.parse_one_frame_options(settings.one_frame_inference)
    h, w = latent_size(inputs.height, inputs.width)
    controls = []
    for image, mask in zip(inputs.control_images, inputs.control_masks):
        latent = image.latent
        if mask is not None:
            from dataset.media import latent_mask

            latent = latent * torch.from_numpy(latent_mask(mask, (w, h)))[None, None, None]
        controls.append(latent)
    clean = S.one_frame_clean_latents(controls, options, (h, w))
    indices = S.one_frame_indices(settings.latent_window_size, len(controls), options)
    noise = initial_noise(make_generator(seed), 1, inputs.height, inputs.width).to(device)
    shared = {**indices.batched(1), **clean.as_kwargs()}
    return sample_section(
        settings, dit, inputs, inputs.text[inputs.prompts[0]], inputs.images[0], shared, noise, section_caches
    )


# ---- decoding and saving -----------------------------------------------------------------------------------------


def decode_video(vae, latent: torch.Tensor, lws: int, bulk: bool, one_frame: bool) -> torch.Tensor:
    """(1, 16, T, h, w) -> pixels (3, frames, H, W) in the VAE dtype on the CPU."""
    from hunyuan_model.vae import decode_latents

    latent = latent.to(vae.device)
    if one_frame:
        return torch.cat([decode_latents(vae, latent[:, :, i : i + 1]) for i in range(latent.shape[2])], 2)[0].cpu()
    if bulk:
        return decode_latents(vae, latent)[0].cpu()
    overlap = S.decode_overlap_frames(lws)
    result = None
    for start, end in tqdm(S.decode_chunk_ranges(latent.shape[2], lws), desc="decoding", leave=False):
        pixels = decode_latents(vae, latent[:, :, start:end]).cpu()
        result = pixels if result is None else S.soft_append(pixels, result, overlap)
    return result[0]


def _unique(path: str) -> str:
    """Never overwrite an earlier output: add -1, -2, ... before the extension when the name is taken. Among N
    processes, suffix n belongs to process n mod N (the bare name to the main process), so two processes writing
    the same second and seed at once never pick the same name."""
    rank, count = launched_rank(), launched_processes()
    root, ext = os.path.splitext(path)
    n = rank
    while True:
        candidate = f"{root}-{n}{ext}" if n else path
        if not os.path.exists(candidate):
            return candidate
        n += count


def time_flag_now() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def save_images_whole(frames: np.ndarray, folder: str, name: str, metadata: dict[str, str] | None) -> list[str]:
    """`save_images`, except that an interruption removes the frames already written (and the folder it made):
    a frame folder is either complete or absent."""
    made = not os.path.isdir(folder)
    before = set(os.listdir(folder)) if not made else set()
    try:
        return save_images(frames, folder, name, metadata)
    except BaseException:
        if os.path.isdir(folder):
            for entry in set(os.listdir(folder)) - before:
                os.remove(os.path.join(folder, entry))
            if made and not os.listdir(folder):
                os.rmdir(folder)
        raise


def save_outputs(
    settings: GenerationSettings,
    latent: torch.Tensor,
    seed: int,
    models: ModelCache,
    metadata: dict[str, str],
    source_name: str = "",
    time_flag: str | None = None,
) -> list[str]:
    """Write what --output_type asks for, with musubi-tuner's file names; returns the written paths."""
    s = settings
    os.makedirs(s.save_path, exist_ok=True)
    time_flag = time_flag or time_flag_now()
    name = f"{time_flag}_{seed}_" + (f"_{source_name}" if source_name else "")
    written = []
    if s.output_type in ("latent", "both", "latent_images"):
        path = _unique(os.path.join(s.save_path, f"{time_flag}_{seed}_latent.safetensors"))
        written.append(save_latent(latent, path, None if s.no_metadata else metadata))
    if s.output_type == "latent":
        return written
    with torch.no_grad():
        pixels = decode_video(models.vae(), latent, s.latent_window_size, s.bulk_decode, s.one_frame)
    models.offload_vae()
    frames = to_uint8_frames(pixels)
    meta = None if s.no_metadata else {**metadata, FRAMES_KEY: str(len(frames))}
    if s.output_type in ("video", "both") and not s.one_frame:
        written.append(save_video(frames, _unique(os.path.join(s.save_path, f"{name}.mp4")), s.fps, meta))
    if s.output_type in ("images", "latent_images") or (s.one_frame and s.output_type in ("video", "both")):
        folder = s.save_path if s.one_frame else _unique(os.path.join(s.save_path, name))
        written += save_images_whole(frames, folder, name, meta)
    for path in written:
        logger.info(f"saved {path}")
    return written


# ---- modes ---------------------------------------------------------------------------------------------------------


@functools.cache
def generation_flags() -> tuple[str, ...]:
    """Destinations of every flag of the script, in --help order (what the metadata records)."""
    return tuple(a.dest for a in build_parser()._actions if a.option_strings and a.dest != "help")


def generation_loras(settings: GenerationSettings, models: ModelSettings) -> LoraSet:
    """The LoRAs of one generation: a prompt line's --lw / --lm, else --lora_weight / --lora_multiplier."""
    weights = settings.lora_weight if settings.lora_weight is not None else models.lora_weight
    if not weights:
        return ()
    multiplier = settings.lora_multiplier if settings.lora_multiplier is not None else models.lora_multiplier
    return lora_set(weights, lora_multipliers(weights, multiplier), models.include_patterns, models.exclude_patterns)


def recorded_values(settings: GenerationSettings, models: ModelSettings) -> argparse.Namespace:
    """Every flag value of one generation (the model flags too, with this generation's LoRAs)."""
    values = {**dataclasses.asdict(models), **dataclasses.asdict(settings)}
    loras = generation_loras(settings, models)
    values["lora_weight"] = [spec.path for spec in loras] or None
    values["lora_multiplier"] = [spec.multiplier for spec in loras] or 1.0
    return argparse.Namespace(**values)


def line_seeds(settings: GenerationSettings) -> list[int | None]:
    """The seeds one prompt renders (None: a random one): --n_seeds from --seed, else --seeds, else --seed."""
    if settings.n_seeds:
        return [None if settings.seed is None else settings.seed + i for i in range(settings.n_seeds)]
    return list(settings.seeds) if settings.seeds else [settings.seed]


def sized_for_generation(settings: GenerationSettings) -> GenerationSettings:
    """--one_frame_auto_resize: the output size from the first control image's aspect ratio, about the area of
    --video_size, sides multiples of 16 (the metadata records the flags as given)."""
    if not (settings.one_frame and settings.one_frame_auto_resize and settings.control_image_path):
        return settings
    from PIL import Image

    with Image.open(settings.control_image_path[0]) as control:
        size = control.size
    width, height = bucket_for_area(size, (settings.width, settings.height))
    logger.info(f"--one_frame_auto_resize: {width}x{height} for a control image of {size[0]}x{size[1]}")
    return settings.replace(video_size=(height, width))


def preview_writer(settings: GenerationSettings, name: str) -> SectionCallback | None:
    if not settings.preview:
        return None
    path = preview_path(settings.save_path, name, settings.preview)
    os.makedirs(settings.save_path, exist_ok=True)

    def write(latent: torch.Tensor) -> None:
        write_preview(latent, path, settings.fps)
        logger.info(f"preview ({latent.shape[2]} latent frames): {path}")

    return write


@dataclass
class FinishedJobs:
    """--skip_done: job key -> kinds of output found in --save_path at the start, plus those written since."""

    found: dict[str, set[str]]

    @classmethod
    def scan(cls, save_path: str) -> FinishedJobs:
        found = finished_outputs(save_path)
        logger.info(f"--skip_done: {len(found)} finished job key(s) in {save_path}")
        return cls(found)

    def has(self, key: str, kinds: set[str]) -> bool:
        return kinds <= self.found.get(key, set())

    def add(self, key: str, kinds: set[str]) -> None:
        self.found.setdefault(key, set()).update(kinds)


def run_one(
    settings: GenerationSettings, models: ModelCache, device: torch.device, done: FinishedJobs | None = None
) -> list[str]:
    """Every seed of one prompt (--seeds / --n_seeds), skipping those already finished with --skip_done."""
    seeds = line_seeds(settings)
    kinds = required_kinds(settings.output_type, settings.one_frame)
    if done is not None and all(seed is None for seed in seeds):
        # random seeds cannot be matched one by one: the prompt counts as done once any output of it exists
        flags = recorded_flags(recorded_values(settings, models.settings), generation_flags())
        if done.has(job_key(flags, None), kinds):
            logger.info(f"--skip_done: {settings.prompt!r} already has outputs (random seeds), skipped")
            return []
    written = []
    for seed in seeds:
        written += run_seed(settings, models, device, seed, done, kinds)
    return written


def run_seed(settings: GenerationSettings, models: ModelCache, device, seed, done: FinishedJobs | None, kinds):
    seed = seed if seed is not None else random.randint(0, SEED_MAX)
    loras = generation_loras(settings, models.settings)
    record = generation_settings(
        recorded_values(settings, models.settings), seed, generation_flags(), [spec.multiplier for spec in loras]
    )
    if done is not None and done.has(record["job"], kinds):
        logger.info(f"--skip_done: {settings.prompt!r} with seed {seed} is already in {settings.save_path}, skipped")
        return []
    logger.info(f"seed {seed}")
    start = time.perf_counter()
    sized = sized_for_generation(settings)
    source = None
    if sized.extend_video:  # read and checked before any model loads
        source = read_extend_source(sized.extend_video, sized.height, sized.width, sized.fps)
    inputs = prepare_inputs(sized, models, seed, source)
    dit = models.dit(loras)
    if models.settings.save_merged_model:
        return [models.settings.save_merged_model]
    time_flag = time_flag_now()
    section_caches = []
    latent = generate_latent(
        sized, dit, inputs, seed, device, preview_writer(settings, f"{time_flag}_{seed}"), section_caches
    )
    models.release_dit()
    if settings.magcache_calibration:
        os.makedirs(settings.save_path, exist_ok=True)
        name = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}_{seed}_magcache_ratios.txt"
        save_magcache_calibration(section_caches, _unique(os.path.join(settings.save_path, name)))
    if models.settings.blocks_to_swap > 0 and device.type == "cuda":
        time.sleep(5)  # let the swap worker threads finish their last transfers, as musubi-tuner does
    meta = {**latent_metadata(settings, seed, inputs.height, inputs.width), **settings_to_metadata(record)}
    if source is not None:
        meta["extend_video"] = source.path
        meta["extend_video_latent_frames"] = str(inputs.extend_latent.shape[2])
        meta["extend_context_frames"] = str(resolve_context_frames(settings.extend_context_frames, settings.f1))
    cache = step_cache_settings(settings).describe()
    if cache is not None:  # not in musubi-tuner; readers ignore unknown keys
        meta["step_cache"] = cache
    written = save_outputs(settings, latent, seed, models, meta, time_flag=time_flag)
    if done is not None:
        done.add(record["job"], kinds)
    logger.info(f"generated in {time.perf_counter() - start:.1f} s")
    return written


LINE_ERRORS = (PromptLineError, ValueError, FileNotFoundError)


def line_settings(base: GenerationSettings, line: str) -> GenerationSettings:
    """The settings of one prompt line, checked as far as that is possible without a model (images decoded)."""
    settings = apply_prompt_line(base, parse_prompt_line(line))
    if not (settings.image_path or settings.extend_video):
        raise PromptLineError("no start image: give --i (or --ev) on the line or --image_path on the command line")
    check_images_readable(settings, line_flag)
    return settings


def run_line(
    base: GenerationSettings, line: str, models: ModelCache, device: torch.device, done: FinishedJobs | None = None
) -> list[str]:
    """Generate one prompt-file / interactive line with its inline options applied to the base settings."""
    return run_one(line_settings(base, line), models, device, done)


def batch_lora_sets(models: ModelSettings, lines: list[GenerationSettings]) -> list[LoraSet] | None:
    """The LoRA sets of a prompt file's lines when they differ (switching needed), else None (merge once)."""
    sets = {model_loras(models)} | {generation_loras(settings, models) for settings in lines}
    return sorted(sets, key=str) if len(sets) > 1 else None


@dataclass
class PromptFile:
    """A prompt file read and every line checked up front: the settings of each good line, the error of each bad
    one, by line number in file order."""

    path: str
    lines: list[tuple[int, str]]
    good: dict[int, GenerationSettings]
    bad: dict[int, str]

    @classmethod
    def read(cls, base: GenerationSettings, path: str) -> PromptFile:
        lines = read_prompt_file(path, "--from_file")
        if not lines:
            raise PromptLineError(f"--from_file {path}: no prompt lines (only blank lines and # comments)")
        good, bad = {}, {}
        for number, line in lines:
            try:
                good[number] = line_settings(base, line)
            except LINE_ERRORS as e:
                bad[number] = str(e)
        if not good:
            problems = "; ".join(f"line {number}: {error}" for number, error in bad.items())
            raise PromptLineError(f"--from_file {path}: no line can run ({problems})")
        return cls(path, lines, good, bad)

    def report(self) -> None:
        """Log each bad line with its number, and which lines will run."""
        for number, error in self.bad.items():
            logger.error(f"{self.path}:{number}: {error}")
        if self.bad:
            logger.warning(
                f"{self.path}: {len(self.bad)} of {len(self.lines)} line(s) cannot run (line "
                f"{', '.join(map(str, self.bad))}); rendering the other {len(self.good)} "
                f"(line {', '.join(map(str, self.good))})"
            )


def run_batch(
    base: GenerationSettings,
    models: ModelCache,
    prompt_file: str,
    device: torch.device,
    skip_done: bool = False,
    processes: Processes = SINGLE_PROCESS,
) -> int:
    """Every prompt line in turn with models loaded once. Every line is checked before any model loads: a file
    without a runnable line is an error; a bad line is reported and the others still run (exit status 1). Among
    several processes, prompt i of the file goes to process i mod N; the main process reports the failed lines of
    all, and every process exits 1 if any line failed."""
    prompts = PromptFile.read(base, prompt_file)
    if processes.is_main:
        prompts.report()
    line_loras = [("--lw", generation_loras(settings, models.settings)) for settings in prompts.good.values()]
    check_loras_fit(models.settings, [("--lora_weight", model_loras(models.settings)), *line_loras])

    models.lora_sets = batch_lora_sets(models.settings, list(prompts.good.values()))
    done = FinishedJobs.scan(base.save_path) if skip_done else None
    lines, failed = prompts.lines, []
    for index, (number, _) in processes.share(list(enumerate(lines, start=1))):
        if number in prompts.bad:
            failed.append(number)
            continue
        logger.info(f"prompt {index}/{len(lines)} (line {number} of {prompt_file})")
        try:
            run_one(prompts.good[number], models, device, done)
        except LINE_ERRORS as e:
            logger.error(f"{prompt_file}:{number}: {e}")
            failed.append(number)
    models.restore_base_weights()
    failed = sorted(processes.gather(failed))
    if failed and processes.is_main:
        lines_failed = ", ".join(map(str, failed))
        logger.error(f"{len(lines) - len(failed)} of {len(lines)} prompts done; failed: line {lines_failed}")
    return 1 if failed else 0


def run_interactive(
    base: GenerationSettings, models: ModelCache, device: torch.device, stream=None, skip_done: bool = False
) -> int:
    """Read prompt lines (same inline options as prompt files) until end of input; each is generated and saved."""
    stream = stream or sys.stdin
    models.lora_sets = [model_loras(models.settings)]  # any line may switch LoRAs
    done = FinishedJobs.scan(base.save_path) if skip_done else None
    prompt_mark = sys.stdin.isatty()
    while True:
        if prompt_mark:
            print("> ", end="", flush=True)
        try:
            line = stream.readline()
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            models.restore_base_weights()
            return 0
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            run_line(base, line, models, device, done)
        except LINE_ERRORS as e:
            logger.error(f"{e}")
        except KeyboardInterrupt:
            logger.warning("interrupted; enter the next prompt (Ctrl+D to quit)")


def run_decode_only(
    base: GenerationSettings, models: ModelCache, latent_paths: list[str], processes: Processes = SINGLE_PROCESS
) -> int:
    """--latent_path: decode saved latents (ours or musubi-tuner's) with the current --output_type; the window size
    and one-frame options stored in a file's metadata take precedence. Among several processes, latent i goes to
    process i mod N."""
    for path in processes.share(latent_paths):
        latent, meta = load_latent(path)
        seed = int(meta.get("seeds", 0))
        settings = base
        if "latent_window_size" in meta:
            settings = settings.replace(latent_window_size=int(meta["latent_window_size"]))
        if "one_frame_inference" in meta and not settings.one_frame:
            settings = settings.replace(one_frame_inference=meta["one_frame_inference"])
        elif latent.shape[1] == 1 and not settings.one_frame:
            settings = settings.replace(one_frame_inference="default")
        name = os.path.splitext(os.path.basename(path))[0]
        save_outputs(settings, latent[None], seed, models, meta, source_name=name)
    return 0


@entry_point
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        if args.show_metadata:
            print(command_line(read_settings(args.show_metadata, "--show_metadata"), parser))
            return 0
        if args.from_metadata:
            recorded = read_settings(args.from_metadata)
            apply_settings(args, recorded, explicit_dests(build_parser(), argv), args.from_metadata)
            logger.info(f"settings of {args.from_metadata}: seed {args.seed}, prompt {args.prompt!r}")
        validate_args(args)
    except (ValueError, MetadataError) as e:
        parser.error(str(e))
    if args.interactive and launched_processes() > 1:
        parser.error("--interactive reads one terminal: run it as a single process")
    processes = start_processes()
    device = processes.device(args.device)
    logger.info(f"device {device}" + (f" (process {processes.rank} of {processes.count})" if processes.several else ""))
    if args.attn_mode not in ("torch", "sdpa"):
        from frame_pack.attention import AttentionBackendError, check_attn_mode

        try:
            check_attn_mode(args.attn_mode)
        except AttentionBackendError as e:
            parser.error(str(e))
    compile_with = compile_settings(args)
    if compile_with is not None and not args.latent_path:
        from frame_pack.compile import CompileUnavailableError, check_compile_available

        try:
            check_compile_available(compile_with, device)
        except CompileUnavailableError as e:
            parser.error(str(e))
    settings = GenerationSettings.from_args(args)
    model_settings = ModelSettings.from_args(args)
    generating = not args.latent_path
    check_model_files(model_settings, generating=generating, decoding=bool(args.vae))
    if generating:
        check_images_readable(settings)
        if not args.from_file:
            check_loras_fit(model_settings, [("--lora_weight", model_loras(model_settings))])
    if args.latent_path:
        for path in args.latent_path:  # every file checked before the first is decoded
            load_latent(path)
    prepare_save_path(settings.save_path)
    on_forced_interrupt(functools.partial(remove_temporary_files, settings.save_path))
    if args.interactive:
        set_interrupt_watchdog_armed(False)  # Ctrl-C skips the current prompt there
    keep = bool(args.latent_path or args.from_file or args.interactive) or len(line_seeds(settings)) > 1
    models = ModelCache(model_settings, device, keep=keep)
    if args.latent_path:
        return run_decode_only(settings, models, args.latent_path, processes)
    if args.from_file:
        return run_batch(settings, models, args.from_file, device, args.skip_done, processes)
    if args.interactive:
        return run_interactive(settings, models, device, skip_done=args.skip_done)
    if not processes.is_main:
        logger.info("one prompt: the main process renders it")
        return 0
    try:
        run_one(settings, models, device, FinishedJobs.scan(settings.save_path) if args.skip_done else None)
    except ExtendVideoError as e:  # found when the whole video is read, still before any model loads
        parser.error(str(e))
    return 0
