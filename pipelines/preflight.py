"""Checks of a generation that read the user's files, run before any model loads.

Every model file's header is checked against the kind its flag names, every LoRA against the DiT's shapes, every
image is decoded once and the output folder is created, so a wrong file or an unwritable folder is reported in one
line within seconds, not after minutes of loading, encoding or sampling. No tensor data of a model is read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from networks.lora_switch import LoraSet
from pipelines.settings import GenerationSettings, ModelSettings
from utils.cli import UsageError
from utils.temporary_files import remove_leftover_temporary_files

logger = logging.getLogger(__name__)


def check_model_files(models: ModelSettings, generating: bool, decoding: bool) -> None:
    """The header of every model file the run will load, checked for its kind and completeness (WeightFileError or
    TokenizerUnavailableError naming the flag and file). `generating`: DiT and encoders; `decoding`: the VAE."""
    if decoding and models.vae:
        from hunyuan_model.vae import read_vae_config

        read_vae_config(models.vae)
    if not generating:
        return
    from frame_pack.dit_loader import read_dit_config
    from hunyuan_model.encoder_loader import plan_encoder
    from hunyuan_model.image_encoder import SIGLIP_SPEC
    from hunyuan_model.text_encoder import CLIP_SPEC, LLAMA_SPEC
    from hunyuan_model.tokenizers import TOKENIZER1, TOKENIZER2, resolve_tokenizer_folder

    read_dit_config(models.dit)
    plan_encoder(LLAMA_SPEC, models.text_encoder1, "--text_encoder1")
    plan_encoder(CLIP_SPEC, models.text_encoder2, "--text_encoder2")
    plan_encoder(SIGLIP_SPEC, models.image_encoder, "--image_encoder")
    resolve_tokenizer_folder(models.tokenizer1, TOKENIZER1, models.text_encoder1)
    resolve_tokenizer_folder(models.tokenizer2, TOKENIZER2, models.text_encoder2)


def check_loras_fit(models: ModelSettings, lora_sets: Iterable[tuple[str, LoraSet]]) -> None:
    """Each (flag, LoRA set) is read and planned against the DiT's shapes (a meta-device skeleton: no DiT weight is
    read), so a file that is not a LoRA, or a LoRA of another model, is refused, naming the flag, before the DiT
    loads. LyCORIS files are checked by the LyCORIS package when they merge."""
    if models.lycoris:
        return
    from frame_pack.dit_loader import dit_skeleton
    from networks.lora_merge import check_loras_fit as check_fit

    sets: dict[LoraSet, str] = {}
    for flag, loras in lora_sets:
        if loras:
            sets.setdefault(loras, flag)
    if not sets:
        return
    skeleton = dit_skeleton(models.dit)
    for loras, flag in sets.items():
        paths, multipliers = [spec.path for spec in loras], [spec.multiplier for spec in loras]
        includes, excludes = [spec.include for spec in loras], [spec.exclude for spec in loras]
        check_fit(skeleton, flag, paths, multipliers, includes, excludes)


def check_images_readable(settings: GenerationSettings, flag_of=lambda field: f"--{field}") -> None:
    """Decode every image the generation reads (start images, end image, control images and masks)."""
    from dataset.media import MediaError, load_image
    from frame_pack.sections import parse_section_spec

    paths: list[tuple[str, str]] = []
    if settings.image_path:
        spec = settings.image_path
        paths += [("image_path", p) for p in (parse_section_spec(spec).values() if ";;;" in spec else [spec])]
    if settings.end_image_path:
        paths.append(("end_image_path", settings.end_image_path))
    paths += [("control_image_path", p) for p in settings.control_image_path or ()]
    paths += [("control_image_mask_path", p) for p in settings.control_image_mask_path or ()]
    for field, path in dict.fromkeys(paths):
        try:
            load_image(path)
        except MediaError as e:
            raise MediaError(f"{flag_of(field)} {e}") from None


def prepare_save_path(path: str, flag: str = "--save_path") -> None:
    """Create the output folder now (or refuse it, naming the flag), so that no run is lost at its first save; remove
    the temporary files a killed generation left in it."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{flag} {path}: exists and is not a folder") from None
    except NotADirectoryError:
        raise UsageError(f"{flag} {path}: a part of this path is a file, not a folder") from None
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create the folder ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder is not writable")
    remove_leftover_temporary_files(path, "*.tmp*")
