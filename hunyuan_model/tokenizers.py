"""Tokenizers of the two text encoders, loaded offline-first.

musubi-tuner always downloads them from `hunyuanvideo-community/HunyuanVideo` (subfolders `tokenizer` and
`tokenizer_2`). Here a local folder (`--tokenizer1` / `--tokenizer2`, or the `tokenizer/` / `tokenizer_2/` folder of
a snapshot given as the text encoder) is used without any network access, and the hub is only asked when nothing local
is available. When the hub cannot be reached the error says which files to fetch and which flag takes the folder.

Tokenizer 1 is built directly from its `tokenizer.json` as a `PreTrainedTokenizerFast`: transformers 5.x's
`LlamaTokenizerFast` may rebuild the pipeline from vocab and merges and lose the `\\n\\n` tokens of the Llama-3
pre-tokenizer, which would shift every crop position.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from utils.cli import UserError

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER_REPO = "hunyuanvideo-community/HunyuanVideo"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class TokenizerUnavailableError(UserError, OSError):
    """No usable tokenizer files locally, and the hub could not provide them."""


@dataclass(frozen=True)
class TokenizerKind:
    label: str
    flag: str
    encoder_flag: str
    subfolder: str  # in the hub repo and in a snapshot folder
    encoder_subfolder: str  # the text encoder's folder inside a snapshot
    required: tuple[str, ...]
    optional: tuple[str, ...] = ("tokenizer_config.json", "special_tokens_map.json")

    @property
    def files(self) -> tuple[str, ...]:
        return self.required + self.optional


TOKENIZER1 = TokenizerKind(
    label="tokenizer 1 (LLaMA)",
    flag="--tokenizer1",
    encoder_flag="--text_encoder1",
    subfolder="tokenizer",
    encoder_subfolder="text_encoder",
    required=("tokenizer.json",),
)
TOKENIZER2 = TokenizerKind(
    label="tokenizer 2 (CLIP)",
    flag="--tokenizer2",
    encoder_flag="--text_encoder2",
    subfolder="tokenizer_2",
    encoder_subfolder="text_encoder_2",
    required=("vocab.json", "merges.txt"),
)


def _has_files(folder: Path, kind: TokenizerKind) -> bool:
    return all((folder / name).is_file() for name in kind.required)


def _local_folder(path: Path, kind: TokenizerKind) -> Path | None:
    """The folder holding the tokenizer files: `path` itself or its `tokenizer*/` subfolder (a snapshot root)."""
    for folder in (path, path / kind.subfolder):
        if folder.is_dir() and _has_files(folder, kind):
            return folder
    return None


def _snapshot_folder(encoder_path: str | os.PathLike | None, kind: TokenizerKind) -> Path | None:
    """A tokenizer folder shipped next to the text encoder: a snapshot root, its `text_encoder*/` folder, or a file
    inside that folder."""
    if not encoder_path:
        return None
    p = Path(encoder_path)
    candidates = [p / kind.subfolder, p.parent / kind.subfolder] if p.is_dir() else []
    if p.is_file() and p.parent.name == kind.encoder_subfolder:
        candidates.append(p.parent.parent / kind.subfolder)
    for folder in candidates:
        if folder.is_dir() and _has_files(folder, kind):
            return folder
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or constants.is_offline_mode()


def _unavailable(kind: TokenizerKind, repo: str, reason: str) -> TokenizerUnavailableError:
    root_note = "" if repo == DEFAULT_TOKENIZER_REPO else " (or the repo root if it has no such subfolder)"
    return TokenizerUnavailableError(
        f"{kind.label} could not be loaded from the Hugging Face Hub repo {repo}: {reason}. "
        f"Download {', '.join(kind.files)} from https://huggingface.co/{repo}/tree/main/{kind.subfolder}{root_note} "
        "into one folder and pass "
        f"it as {kind.flag} <folder> (or give a HunyuanVideo snapshot folder that contains {kind.subfolder}/ as "
        f"{kind.encoder_flag})."
    )


def _download(repo: str, kind: TokenizerKind) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError

    offline = _offline()
    last_error: Exception | None = None
    for subfolder in (kind.subfolder, None):  # the HunyuanVideo layout first, then the repo root
        try:
            paths = [
                hf_hub_download(repo, name, subfolder=subfolder, local_files_only=offline) for name in kind.required
            ]
        except RemoteEntryNotFoundError as e:
            last_error = e
            continue
        except Exception as e:  # offline mode, no network, unknown repo, cache miss: all end the same way
            reason = "offline mode (HF_HUB_OFFLINE) and not in the local cache" if offline else str(e).splitlines()[0]
            raise _unavailable(kind, repo, reason) from e
        for name in kind.optional:
            try:
                hf_hub_download(repo, name, subfolder=subfolder, local_files_only=offline)
            except EntryNotFoundError:
                logger.debug("%s: %s not in %s", kind.label, name, repo)
            except Exception as e:
                raise _unavailable(kind, repo, str(e).splitlines()[0]) from e
        return Path(paths[0]).parent
    raise _unavailable(kind, repo, f"{', '.join(kind.required)} not found in the repo") from last_error


def resolve_tokenizer_folder(value: str | None, kind: TokenizerKind, encoder_path: str | os.PathLike | None) -> Path:
    """Where to read the tokenizer from: the flag's value (local folder or hub id), else the text encoder's snapshot,
    else musubi-tuner's hub repo."""
    if value:
        p = Path(value).expanduser()
        if p.is_file():  # e.g. the path of tokenizer.json itself
            p = p.parent
        if p.exists():
            folder = _local_folder(p, kind)
            if folder is None:
                raise TokenizerUnavailableError(
                    f"{kind.flag} {value}: no {', '.join(kind.required)} in this folder or in its {kind.subfolder}/ "
                    f"subfolder; it needs {', '.join(kind.files)}"
                )
            return folder
        if not _HUB_ID.match(value):
            raise TokenizerUnavailableError(f"{kind.flag} {value}: no such folder (and not a hub repo id)")
        return _download(value, kind)
    folder = _snapshot_folder(encoder_path, kind)
    if folder is not None:
        logger.info("Using %s from the text encoder snapshot: %s", kind.label, folder)
        return folder
    return _download(DEFAULT_TOKENIZER_REPO, kind)


def _tokenizer_kwargs(folder: Path) -> dict:
    """Special tokens and model_max_length from tokenizer_config.json, overridden by special_tokens_map.json (as
    transformers does)."""
    kwargs: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for key in SPECIAL_TOKEN_NAMES:
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                kwargs[key] = value
        if isinstance(data.get("model_max_length"), int):
            kwargs["model_max_length"] = data["model_max_length"]
    return kwargs


def load_tokenizer1(tokenizer1: str | None = None, text_encoder1: str | os.PathLike | None = None):
    """LLaMA tokenizer as `PreTrainedTokenizerFast` from `tokenizer.json`, padding on the right (the crop needs it)."""
    from transformers import PreTrainedTokenizerFast

    folder = resolve_tokenizer_folder(tokenizer1, TOKENIZER1, text_encoder1)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        padding_side="right",
        truncation_side="right",
        **_tokenizer_kwargs(folder),
    )
    if tokenizer.pad_token is None:  # padding to max_length needs one; padded positions are cropped away anyway
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("Loaded %s from %s", TOKENIZER1.label, folder)
    return tokenizer


def load_tokenizer2(tokenizer2: str | None = None, text_encoder2: str | os.PathLike | None = None):
    """CLIP tokenizer built from `vocab.json` + `merges.txt` (bos `<|startoftext|>`, eos/pad `<|endoftext|>`)."""
    from transformers import CLIPTokenizer

    folder = resolve_tokenizer_folder(tokenizer2, TOKENIZER2, text_encoder2)
    with open(folder / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    with open(folder / "merges.txt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, padding_side="right", **_tokenizer_kwargs(folder))
    logger.info("Loaded %s from %s", TOKENIZER2.label, folder)
    return tokenizer
