"""fpack_generate_video.py: FramePack image-to-video generation, batch and interactive modes, decode-only mode.

One generation: encode the section prompts (LLaMA + CLIP) and images (SigLIP + VAE), then sample the sections in
generation order (inverted anti-drifting: video end first; F1: video start first), then decode and save.
Random draws follow the reference: one CPU generator seeded with the seed, one noise draw per section.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import torch
from tqdm.auto import tqdm

from dataset.buckets import resize_image_to_bucket
from dataset.media import load_image
from frame_pack import sections as S
from frame_pack.sampling import flow_match_x0_model, initial_noise, make_generator, sample_flow
from pipelines.generate_args import (
    PromptLineError,
    apply_prompt_line,
    build_parser,
    lora_multipliers,
    parse_prompt_line,
    read_prompt_file,
    validate_args,
)
from pipelines.latent_file import latent_metadata, load_latent, save_latent
from utils.device import clean_memory, resolve_device
from utils.video_io import save_images, save_video, to_uint8_frames

logger = logging.getLogger(__name__)

SEED_MAX = 2**32 - 1


# ---- models --------------------------------------------------------------------------------------------------------


class Models:
    """Loads each model when first needed. With `keep` (batch/interactive) encoders stay loaded on the CPU
    between prompts; otherwise each is released as soon as its work is done, as the reference does."""

    def __init__(self, args: argparse.Namespace, device: torch.device, keep: bool):
        self.args, self.device, self.keep = args, device, keep
        self._text = None
        self._image_encoder = None
        self._vae = None
        self._dit = None

    def text(self):
        """(tokenizer1, text_encoder1, tokenizer2, text_encoder2) on the device."""
        from hunyuan_model.text_encoder import load_text_encoder1, load_text_encoder2
        from hunyuan_model.tokenizers import load_tokenizer1, load_tokenizer2

        a = self.args
        if self._text is None:
            self._text = (
                load_tokenizer1(a.tokenizer1, a.text_encoder1),
                load_text_encoder1(a.text_encoder1, self.device, fp8_llm=a.fp8_llm),
                load_tokenizer2(a.tokenizer2, a.text_encoder2),
                load_text_encoder2(a.text_encoder2, self.device),
            )
        else:
            for model in self._text[1::2]:
                model.to(self.device)
        return self._text

    def image_encoder(self):
        from hunyuan_model.image_encoder import load_image_encoder

        if self._image_encoder is None:
            self._image_encoder = load_image_encoder(self.args.image_encoder, self.device)
        return self._image_encoder.to(self.device)

    def vae(self):
        from hunyuan_model.vae import compute_dtype, load_vae

        if self._vae is None:
            a = self.args
            self._vae = load_vae(
                a.vae,
                "cpu",
                dtype=compute_dtype(self.device),
                chunk_size=a.vae_chunk_size,
                spatial_tile_sample_min_size=a.vae_spatial_tile_sample_min_size,
            )
        return self._vae.to(self.device)

    def release_encoders(self) -> None:
        if self.keep:
            for model in (*(self._text or ())[1::2], self._image_encoder):
                if model is not None:
                    model.to("cpu")
        else:
            self._text = self._image_encoder = None
        clean_memory(self.device)

    def offload_vae(self) -> None:
        if self._vae is not None:
            self._vae.to("cpu")
        clean_memory(self.device)

    def dit(self):
        if self._dit is None:
            self._dit = load_dit(self.args, self.device)
        elif self._dit.block_swap is None:
            self._dit.to(self.device)
        return self._dit

    def release_dit(self) -> None:
        if self.keep and self._dit is not None and self._dit.block_swap is None:
            self._dit.to("cpu")
        elif not self.keep:
            self._dit = None
        clean_memory(self.device)


def load_dit(args: argparse.Namespace, device: torch.device):
    """Load, merge LoRAs, optionally save the merged model, quantize, place on the device."""
    from frame_pack.dit_loader import load_packed_model
    from frame_pack.fp8 import apply_fp8

    on_device = args.blocks_to_swap == 0 and not (args.fp8 or args.fp8_scaled) and not args.lora_weight
    model = load_packed_model(args.dit, device if on_device else "cpu", attn_mode=args.attn_mode)
    if args.lora_weight:
        from networks.lora_merge import merge_lora_files

        merge_lora_files(
            model,
            args.lora_weight,
            lora_multipliers(args),
            include_patterns=args.include_patterns,
            exclude_patterns=args.exclude_patterns,
            device=device,
            lycoris=args.lycoris,
        )
        if args.save_merged_model:
            from networks.lora_merge import save_merged_model

            save_merged_model(model, args.save_merged_model)
            logger.info(f"merged DiT saved to {args.save_merged_model}")
            return model
    if args.fp8 or args.fp8_scaled:
        apply_fp8(model, scaled=args.fp8_scaled, device=device, keep_on_device=args.blocks_to_swap == 0)
    model.enable_rope_scaling(args.rope_scaling_timestep_threshold, args.rope_scaling_factor)
    if args.blocks_to_swap > 0:
        model.enable_block_swap(args.blocks_to_swap, device)
    model.move_to_device_except_swap_blocks(device)
    return model.eval().requires_grad_(False)


def dit_dtype(model) -> torch.dtype:
    """The dtype activations run in: the checkpoint's dtype (fp8 keeps it for non-quantized layers)."""
    return model.x_embedder.proj.weight.dtype


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
    prompts: dict[int, str]
    text: dict[str, dict[str, torch.Tensor]]  # prompt -> DiT text kwargs (CPU)
    negative: dict[str, torch.Tensor] | None
    images: dict[int, SectionImage]
    end_image: SectionImage | None = None
    control_images: list[SectionImage] = field(default_factory=list)
    control_masks: list[np.ndarray | None] = field(default_factory=list)


def read_section_image(path: str, height: int, width: int) -> SectionImage:
    image = load_image(path, keep_alpha=True)
    array = resize_image_to_bucket(image, (width, height))
    if array.shape[-1] == 4:
        return SectionImage(np.ascontiguousarray(array[..., :3]), np.ascontiguousarray(array[..., 3]))
    return SectionImage(array, None)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, 1, H, W) in [-1, 1]: x / 127.5 - 1."""
    return (torch.from_numpy(pixels).float() / 127.5 - 1.0).permute(2, 0, 1)[None, :, None]


def read_mask(path: str, height: int, width: int) -> np.ndarray:
    """A mask file resized and cropped exactly like its image (the reference skipped the crop), grayscale uint8."""
    return resize_image_to_bucket(load_image(path).convert("L"), (width, height))


def text_kwargs(llama_vec, llama_mask, clip_pooler) -> dict[str, torch.Tensor]:
    return {"encoder_hidden_states": llama_vec, "encoder_attention_mask": llama_mask, "pooled_projections": clip_pooler}


def prepare_inputs(args: argparse.Namespace, models: Models, seed: int) -> PreparedInputs:
    from hunyuan_model.image_encoder import encode_image
    from hunyuan_model.text_encoder import encode_prompt_conds
    from hunyuan_model.vae import encode_pixels

    height, width = args.video_size
    one_frame = bool(args.one_frame_inference)
    image_paths = S.parse_section_spec(args.image_path)
    prompts = S.parse_section_spec(args.prompt)
    if one_frame:  # one-frame mode uses section 0's prompt and image only
        image_paths, prompts = {0: image_paths[0]}, {0: prompts[0]}
    images = {i: read_section_image(p, height, width) for i, p in image_paths.items()}
    end_image = None
    if args.end_image_path and not args.f1 and not one_frame:
        end_image = read_section_image(args.end_image_path, height, width)
    controls = [read_section_image(p, height, width) for p in args.control_image_path or []]
    mask_paths = args.control_image_mask_path or []
    masks = [
        read_mask(mask_paths[i], height, width) if i < len(mask_paths) else controls[i].alpha
        for i in range(len(controls))
    ]

    tok1, enc1, tok2, enc2 = models.text()
    text = {}
    for prompt in dict.fromkeys(prompts.values()):
        logger.info(f"encoding prompt: {prompt!r}")
        text[prompt] = text_kwargs(*encode_prompt_conds(prompt, enc1, enc2, tok1, tok2, args.custom_system_prompt))
    negative = None
    if args.guidance_scale != 1.0:
        negative = text_kwargs(
            *encode_prompt_conds(args.negative_prompt or "", enc1, enc2, tok1, tok2, args.custom_system_prompt)
        )
    image_encoder = models.image_encoder()
    with torch.no_grad():
        for image in images.values():
            image.embedding = encode_image(image.pixels, image_encoder).cpu()
    models.release_encoders()

    vae = models.vae()
    generator = torch.Generator(device=vae.device if vae.device.type == "cuda" else "cpu").manual_seed(seed)
    for image in [*images.values(), *([end_image] if end_image else []), *controls]:
        image.latent = encode_pixels(vae, pixels_to_tensor(image.pixels), generator).float().cpu()
    models.offload_vae()
    return PreparedInputs(height, width, prompts, text, negative, images, end_image, controls, masks)


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


def sample_section(args, dit, inputs: PreparedInputs, text_prompt: str, image: SectionImage, shared: dict, noise):
    device, dtype = noise.device, dit_dtype(dit)
    shared = _to({"image_embeddings": image.embedding, **shared}, device, dtype)
    positive = _to(inputs.text[text_prompt], device, dtype)
    negative = _to(inputs.negative, device, dtype) if inputs.negative is not None else None
    model_x0 = flow_match_x0_model(
        dit,
        positive,
        negative,
        shared=shared,
        embedded_cfg_scale=args.embedded_cfg_scale,
        guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale,
        dtype=dtype,
    )
    use_teacache = args.teacache_thresh is not None
    if use_teacache and args.guidance_scale != 1.0:
        logger.warning("--teacache_thresh is ignored with --guidance_scale != 1 (two model calls per step)")
        use_teacache = False
    if use_teacache:
        dit.enable_teacache(args.infer_steps, args.teacache_thresh)
    try:
        with torch.no_grad():
            return sample_flow(model_x0, noise, args.infer_steps, args.sample_solver).cpu()
    finally:
        if use_teacache:
            logger.info(f"TeaCache skipped the blocks on {dit.teacache.skipped} of {args.infer_steps} steps")
            dit.disable_teacache()


def generate_latent(args: argparse.Namespace, dit, inputs: PreparedInputs, seed: int, device) -> torch.Tensor:
    """Sample every section; returns the time-ordered video latent (1, 16, T, h, w) fp32 on the CPU."""
    if args.one_frame_inference:
        return generate_one_frame(args, dit, inputs, seed, device)
    lws = args.latent_window_size
    n_sections = S.total_sections(args.video_seconds, lws, args.video_sections)
    plans = S.plan_sections(n_sections, lws, f1=args.f1, latent_paddings=S.parse_latent_paddings(args.latent_paddings))
    generator = make_generator(seed)
    first = inputs.images[0].latent
    history = S.new_history(first, f1=args.f1, end_latent=inputs.end_image.latent if inputs.end_image else None)
    mode = "F1 (forward)" if args.f1 else "inverted anti-drifting"
    logger.info(f"{n_sections} section(s), {mode}, {S.video_pixel_frames(n_sections, lws)} frames")
    for plan in tqdm(plans, desc="sections", disable=len(plans) == 1):
        image_key = S.select_section_key(inputs.images, plan.section_index, plan.section_index_from_last)
        prompt_key = S.select_section_key(inputs.prompts, plan.section_index, plan.section_index_from_last)
        image, prompt = inputs.images[image_key], inputs.prompts[prompt_key]
        logger.info(
            f"section {plan.generation_step + 1}/{n_sections}: video section {plan.section_index}, "
            f"padding {plan.latent_padding}, image #{image_key}, prompt #{prompt_key}"
        )
        noise = initial_noise(generator, S.section_frames(lws), inputs.height, inputs.width).to(device)
        clean = S.clean_latents_from_history(history, image.latent, f1=args.f1)
        shared = {**plan.indices.batched(1), **clean.as_kwargs()}
        generated = sample_section(args, dit, inputs, prompt, image, shared, noise)
        history = S.update_history(history, generated, plan, image.latent)
    return S.video_latent_from_history(history, f1=args.f1)


def generate_one_frame(args, dit, inputs: PreparedInputs, seed: int, device) -> torch.Tensor:
    """One-frame inference: one noisy frame at `target_index`, control images as clean latents."""
    options = S.parse_one_frame_options(args.one_frame_inference)
    h, w = inputs.height // 8, inputs.width // 8
    controls = []
    for image, mask in zip(inputs.control_images, inputs.control_masks):
        latent = image.latent
        if mask is not None:
            from dataset.media import latent_mask

            latent = latent * torch.from_numpy(latent_mask(mask, (w, h)))[None, None, None]
        controls.append(latent)
    clean = S.one_frame_clean_latents(controls, options, (h, w))
    indices = S.one_frame_indices(args.latent_window_size, len(controls), options)
    noise = initial_noise(make_generator(seed), 1, inputs.height, inputs.width).to(device)
    shared = {**indices.batched(1), **clean.as_kwargs()}
    return sample_section(args, dit, inputs, inputs.prompts[0], inputs.images[0], shared, noise)


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
    """Never overwrite an earlier output: add -1, -2, ... before the extension when the name is taken."""
    root, ext = os.path.splitext(path)
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{root}-{n}{ext}"
    return candidate


def save_outputs(
    args, latent: torch.Tensor, seed: int, models: Models, metadata: dict[str, str], source_name: str = ""
) -> list[str]:
    """Write what --output_type asks for, with the reference's names; returns the written paths."""
    os.makedirs(args.save_path, exist_ok=True)
    time_flag = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{time_flag}_{seed}_" + (f"_{source_name}" if source_name else "")
    written = []
    if args.output_type in ("latent", "both", "latent_images"):
        path = _unique(os.path.join(args.save_path, f"{time_flag}_{seed}_latent.safetensors"))
        written.append(save_latent(latent, path, None if args.no_metadata else metadata))
    if args.output_type == "latent":
        return written
    one_frame = bool(args.one_frame_inference)
    with torch.no_grad():
        pixels = decode_video(models.vae(), latent, args.latent_window_size, args.bulk_decode, one_frame)
    models.offload_vae()
    frames = to_uint8_frames(pixels)
    meta = None if args.no_metadata else dict(metadata)
    if args.output_type in ("video", "both") and not one_frame:
        written.append(save_video(frames, _unique(os.path.join(args.save_path, f"{name}.mp4")), args.fps, meta))
    if args.output_type in ("images", "latent_images") or (one_frame and args.output_type in ("video", "both")):
        folder = args.save_path if one_frame else _unique(os.path.join(args.save_path, name))
        written += save_images(frames, folder, name, meta)
    for path in written:
        logger.info(f"saved {path}")
    return written


# ---- modes ---------------------------------------------------------------------------------------------------------


def run_one(args: argparse.Namespace, models: Models, device: torch.device) -> list[str]:
    seed = args.seed if args.seed is not None else random.randint(0, SEED_MAX)
    logger.info(f"seed {seed}")
    start = time.perf_counter()
    inputs = prepare_inputs(args, models, seed)
    dit = models.dit()
    if args.save_merged_model:
        return [args.save_merged_model]
    latent = generate_latent(args, dit, inputs, seed, device)
    models.release_dit()
    if args.blocks_to_swap > 0 and device.type == "cuda":
        time.sleep(5)  # let the swap worker threads finish their last transfers, as the reference does
    meta = latent_metadata(args, seed, inputs.height, inputs.width)
    written = save_outputs(args, latent, seed, models, meta)
    logger.info(f"generated in {time.perf_counter() - start:.1f} s")
    return written


LINE_ERRORS = (PromptLineError, ValueError, FileNotFoundError)


def run_line(base: argparse.Namespace, line: str, models: Models, device: torch.device) -> list[str]:
    """Generate one prompt-file / interactive line with its inline options applied to the base flags."""
    args = apply_prompt_line(base, parse_prompt_line(line))
    if not args.image_path:
        raise PromptLineError("no start image: give --i on the line or --image_path on the command line")
    models.args = args
    return run_one(args, models, device)


def run_batch(args: argparse.Namespace, device: torch.device) -> int:
    """Every prompt line in turn with models loaded once; a bad line is reported and the others still run."""
    lines = read_prompt_file(args.from_file)
    models = Models(args, device, keep=True)
    failed = []
    for index, (number, line) in enumerate(lines, start=1):
        logger.info(f"prompt {index}/{len(lines)} (line {number} of {args.from_file})")
        try:
            run_line(args, line, models, device)
        except LINE_ERRORS as e:
            logger.error(f"{args.from_file}:{number}: {e}")
            failed.append(number)
    if failed:
        logger.error(f"{len(failed)} of {len(lines)} prompts failed (lines {', '.join(map(str, failed))})")
    return 1 if failed else 0


def run_interactive(args: argparse.Namespace, device: torch.device, stream=None) -> int:
    """Read prompt lines (same inline options as prompt files) until end of input; each is generated and saved."""
    stream = stream or sys.stdin
    models = Models(args, device, keep=True)
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
            return 0
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            run_line(args, line, models, device)
        except LINE_ERRORS as e:
            logger.error(f"{e}")
        except KeyboardInterrupt:
            logger.warning("interrupted; enter the next prompt (Ctrl+D to quit)")


def run_decode_only(args: argparse.Namespace, device: torch.device) -> int:
    """--latent_path: decode saved latents (ours or the reference's) with the current --output_type."""
    models = Models(args, device, keep=True)
    for path in args.latent_path:
        latent, meta = load_latent(path)
        seed = int(meta.get("seeds", 0))
        if "latent_window_size" in meta:
            args.latent_window_size = int(meta["latent_window_size"])
        if "one_frame_inference" in meta and not args.one_frame_inference:
            args.one_frame_inference = meta["one_frame_inference"]
        elif latent.shape[1] == 1 and not args.one_frame_inference:
            args.one_frame_inference = "default"
        base = os.path.splitext(os.path.basename(path))[0]
        save_outputs(args, latent[None], seed, models, meta, source_name=base)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
    except ValueError as e:
        parser.error(str(e))
    device = resolve_device(args.device)
    logger.info(f"device {device}")
    if args.attn_mode not in ("torch", "sdpa"):
        from frame_pack.attention import AttentionBackendError, check_attn_mode

        try:
            check_attn_mode(args.attn_mode)
        except AttentionBackendError as e:
            parser.error(str(e))
    if args.latent_path:
        return run_decode_only(args, device)
    if args.from_file:
        return run_batch(args, device)
    if args.interactive:
        return run_interactive(args, device)
    run_one(args, Models(args, device, keep=False), device)
    return 0
