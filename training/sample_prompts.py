"""Sampling during training (`--sample_prompts`, `--sample_every_n_steps/epochs`, `--sample_at_first`).

Prompts are encoded once at the start (text encoders, SigLIP, VAE start latents) through the generation code
(`pipelines.generate.prepare_inputs`), and each sample is generated with the DiT being trained (LoRA applied) by
`pipelines.generate.generate_latent`, so training samples are exactly what `fpack_generate_video.py` would make
with the same LoRA, seed and settings. Normal, F1 (`--f1`) and one-frame (`--one_frame`, prompt `--of`) modes.

Differences from musubi-tuner, each deliberate: the prompt text itself is not scanned for options (musubi-tuner
took a prompt starting with e.g. "i like" as an image path); a prompt without an image, with a size that is not a
multiple of 16, or with a missing file fails at startup instead of mid-training; one-frame prompts work with 2x/4x
clean latents (musubi-tuner needs `no_2x,no_4x`); the LoRA runs without dropout while sampling; sampling leaves
every random generator as it found it, so sampling settings never change the trained weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from frame_pack.sampling import MAX_INFER_STEPS
from hunyuan_model.frame_math import pixel_frames, round_to_4n_plus_1, sections_in_clip
from hunyuan_model.latent_preview import preview_path, write_preview
from pipelines import generate as G
from pipelines.generate_args import check_video_size
from pipelines.models import ModelCache
from pipelines.prompt_line import LineOption, parse_line_options, read_prompt_file
from pipelines.settings import GenerationSettings, ModelSettings
from training.rng import preserved_rng
from utils.cli import UsageError, UserError, one_line
from utils.device import clean_memory
from utils.toml_file import read_toml
from utils.video_io import save_images, save_video, to_uint8_frames

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 20
DEFAULT_SIZE = 256
DEFAULT_FRAME_COUNT = 1
DEFAULT_DISTILLED_GUIDANCE = 10.0  # FramePack's default embedded guidance for samples
SAMPLE_FPS = 24
SAMPLE_FOLDER = "sample"
# Training flags that name the models sampling loads (the DiT is the one being trained).
MODEL_FLAGS = (
    "vae",
    "text_encoder1",
    "text_encoder2",
    "tokenizer1",
    "tokenizer2",
    "image_encoder",
    "fp8_llm",
    "vae_chunk_size",
    "vae_spatial_tile_sample_min_size",
    "vae_dtype",
)

# Training flags of the step caches, applied to every sample (the same flags as fpack_generate_video.py).
STEP_CACHE_FLAGS = (
    "teacache_thresh",
    "magcache_mag_ratios",
    "magcache_retention_ratio",
    "magcache_threshold",
    "magcache_k",
    "magcache_calibration",
)

# Inline options of a sample prompt line.
LINE_OPTIONS = {
    "w": LineOption("width", int),
    "h": LineOption("height", int),
    "f": LineOption("frame_count", int),
    "d": LineOption("seed", int),
    "s": LineOption("sample_steps", int),
    "g": LineOption("guidance_scale", float),
    "fs": LineOption("discrete_flow_shift", float),
    "l": LineOption("cfg_scale", float),
    "n": LineOption("negative_prompt"),
    "i": LineOption("image_path"),
    "cn": LineOption("control_video_path"),
    "ci": LineOption("control_image_path", repeat=True),
    "of": LineOption("one_frame"),
}


def parse_prompt_line(line: str) -> dict:
    """`a cat --w 256 --h 256 --d 1 --i start.png` -> {'prompt': 'a cat', 'width': 256, ...}.

    Options are matched case-insensitively; an unknown option or a bad number is logged and ignored, as
    musubi-tuner does. `--s` is clamped to 1..1000.
    """
    text, values = parse_line_options(line, LINE_OPTIONS, strict=False, ignore_case=True)
    prompt: dict = {"prompt": text}
    for name, value in values.items():
        prompt[LINE_OPTIONS[name].field] = max(1, min(MAX_INFER_STEPS, value)) if name == "s" else value
    return prompt


def load_prompts(path: str) -> list[dict]:
    """Prompts of a .txt (one per line, `#` comments), .toml (`[prompt]` shared keys + `[[prompt.subset]]`) or
    .json (list of strings or dicts) file, each with `enum` = its position."""
    if path.endswith(".txt"):
        prompts: list = [line for _, line in read_prompt_file(path, "--sample_prompts")]
    elif path.endswith(".toml"):
        table = read_toml(path, "--sample_prompts").get("prompt")
        subsets = table.get("subset", []) if isinstance(table, dict) else None
        if not isinstance(subsets, list) or not all(isinstance(subset, dict) for subset in subsets):
            raise UsageError(f"--sample_prompts {path}: needs a [prompt] table with [[prompt.subset]] tables")
        shared = {k: v for k, v in table.items() if k != "subset"}
        prompts = [{**shared, **subset} for subset in subsets]
    elif path.endswith(".json"):
        prompts = read_json_prompts(path)
    else:
        raise UsageError(f"--sample_prompts {path}: use a .txt, .toml or .json file")
    result = []
    for i, prompt in enumerate(prompts):
        prompt = parse_prompt_line(prompt) if isinstance(prompt, str) else dict(prompt)
        prompt.pop("subset", None)
        prompt["enum"] = i
        result.append(prompt)
    return result


def read_json_prompts(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--sample_prompts {path}: not a JSON file ({one_line(e)})") from None
    if not isinstance(prompts, list) or not all(isinstance(p, (str, dict)) for p in prompts):
        raise UsageError(f"--sample_prompts {path}: give a JSON list of prompt strings or tables")
    return prompts


def check_sample_prompts(args: argparse.Namespace) -> None:
    """Every sample prompt is read and turned into generation settings (images found, sizes valid) before the
    datasets or any model load; an empty prompt file is refused, as it would sample nothing."""
    from pipelines.generate_args import check_run_values

    path = args.sample_prompts
    prompts = load_prompts(path)
    if not prompts:
        raise UsageError(f"--sample_prompts {path}: holds no prompt (only comments or blank lines)")
    option_of = {option.field: f"--{name}" for name, option in LINE_OPTIONS.items()}
    option_of["video_sections"] = option_of["frame_count"]  # the sections a sample has come from its --f
    for prompt in prompts:
        try:
            settings = generation_settings(args, prompt)
            if settings is not None:
                check_run_values(settings, lambda field: option_of.get(field, f"--{field}"))
        except (UserError, TypeError, ValueError) as e:  # TypeError: a value of the wrong type in a .toml/.json
            where = "" if str(e).startswith("sample prompt") else f"sample prompt {prompt['enum']}: "
            raise UsageError(f"--sample_prompts {path}: {where}{one_line(e)}") from None


def should_sample(args: argparse.Namespace, steps: int, epoch: int | None) -> bool:
    """Step 0: only with --sample_at_first. Otherwise every N steps, or at an epoch end every N epochs."""
    if steps == 0:
        return args.sample_at_first
    by_steps = args.sample_every_n_steps is not None and steps % args.sample_every_n_steps == 0
    by_epochs = args.sample_every_n_epochs is not None and epoch is not None and epoch % args.sample_every_n_epochs == 0
    return by_steps or by_epochs


@dataclass
class PreparedSample:
    enum: int
    settings: GenerationSettings
    inputs: G.PreparedInputs


def sample_model_settings(args: argparse.Namespace) -> ModelSettings:
    """The encoders and VAE sampling loads, from the training flags of the same names."""
    return ModelSettings(**{flag: getattr(args, flag) for flag in MODEL_FLAGS})


def generation_settings(args: argparse.Namespace, prompt: dict) -> GenerationSettings | None:
    """The generation settings of one training prompt; None (with a warning) when it yields no video."""
    where = f"sample prompt {prompt['enum']}"
    height, width = prompt.get("height", DEFAULT_SIZE), prompt.get("width", DEFAULT_SIZE)
    check_video_size(height, width, where)
    image_path = prompt.get("image_path")
    if not image_path:
        raise UsageError(f"{where} has no start image (--i path): FramePack samples need one")
    control_image_path = tuple(prompt.get("control_image_path") or ()) or None
    for path in [image_path, *(control_image_path or ())]:
        if not os.path.exists(path):
            raise UsageError(f"{where}: image {path} not found")
    settings = GenerationSettings(
        prompt=prompt.get("prompt", ""),
        negative_prompt=prompt.get("negative_prompt"),
        video_size=(height, width),
        infer_steps=prompt.get("sample_steps", DEFAULT_STEPS),
        embedded_cfg_scale=prompt.get("guidance_scale", DEFAULT_DISTILLED_GUIDANCE),
        guidance_scale=prompt.get("cfg_scale") or 1.0,
        seed=prompt.get("seed"),
        image_path=image_path,
        control_image_path=control_image_path,
        latent_window_size=args.latent_window_size,
        f1=args.f1,
        bulk_decode=args.bulk_decode,
        **{flag: getattr(args, flag) for flag in STEP_CACHE_FLAGS},
    )
    if args.one_frame:
        return settings.replace(one_frame_inference=prompt.get("one_frame") or "default")
    frames = round_to_4n_plus_1(prompt.get("frame_count", DEFAULT_FRAME_COUNT))
    sections = sections_in_clip(frames, args.latent_window_size)
    if sections < 1:
        logger.warning(
            f"{where}: {frames} frames make no section of {args.latent_window_size} latent frames "
            f"(give --f {pixel_frames(1 + args.latent_window_size)} or more, or train with --one_frame); it is skipped"
        )
        return None
    return settings.replace(video_sections=sections)


class SampleGenerator:
    """Prompts prepared at startup; `sample` generates and saves them with the current LoRA (main process only)."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        prompts = load_prompts(args.sample_prompts)
        prepared = [(p, generation_settings(args, p)) for p in prompts]
        prepared = [(p, settings) for p, settings in prepared if settings is not None]
        self.samples: list[PreparedSample] = []
        self.models = ModelCache(sample_model_settings(args), device, keep=True)
        with preserved_rng(), torch.no_grad():
            for prompt, settings in prepared:
                inputs = G.prepare_inputs(settings, self.models, settings.seed or 0)
                self.samples.append(PreparedSample(prompt["enum"], settings, inputs))
        self.models.keep = False
        self.models.release_encoders()
        logger.info(f"{len(self.samples)} sample prompt(s) prepared")

    def sample(self, dit, network, epoch: int | None, steps: int) -> list[str]:
        """Generate every prompt with `dit` (LoRA applied); returns the written files."""
        written = []
        was_training = network.training
        network.eval()
        try:
            with preserved_rng(), torch.no_grad():
                for sample in self.samples:
                    written += self._one(dit, sample, epoch, steps)
        finally:
            network.train(was_training)
            clean_memory(self.device)
        return written

    def _one(self, dit, sample: PreparedSample, epoch: int | None, steps: int) -> list[str]:
        args, settings = self.args, sample.settings
        seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(4), "little")
        logger.info(f"sample {sample.enum}: {settings.prompt!r}, seed {seed}, {settings.width}x{settings.height}")
        folder = os.path.join(args.output_dir, SAMPLE_FOLDER)
        os.makedirs(folder, exist_ok=True)
        number = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
        prefix = f"{args.output_name}_" if args.output_name else ""
        suffix = f"_{settings.seed}" if settings.seed is not None else ""
        base = f"{prefix}{number}_{sample.enum:02d}_{time.strftime('%Y%m%d%H%M%S', time.localtime())}{suffix}"
        on_section = None
        if getattr(args, "sample_preview", None):
            preview = preview_path(folder, base, args.sample_preview)

            def on_section(latent):
                write_preview(latent, preview, SAMPLE_FPS)

        latent = G.generate_latent(settings, dit, sample.inputs, seed, self.device, on_section)
        vae = self.models.vae()
        pixels = G.decode_video(vae, latent, settings.latent_window_size, settings.bulk_decode, settings.one_frame)
        self.models.offload_vae()
        frames = to_uint8_frames(pixels)
        if len(frames) == 1:
            return save_images(frames, folder, base)
        return [save_video(frames, os.path.join(folder, base + ".mp4"), SAMPLE_FPS)]
