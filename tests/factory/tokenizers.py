"""Tiny local tokenizers built like the real ones, with BPE merges learned deterministically from a fixed corpus.

* LLaMA-3 style (`tokenizer/`): byte-level BPE `tokenizer.json` with the Llama-3 split regex, `<|begin_of_text|>`
  added by a template post-processor, and the header/turn special tokens; `\\n\\n` is a single token as in the
  real vocabulary.
* CLIP style (`tokenizer_2/`): `vocab.json` + `merges.txt` with `</w>` word ends, the 512 byte symbols first and
  `<|startoftext|>`, `<|endoftext|>` last (so end-of-text has the highest id, as CLIP's legacy pooling assumes).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

LLAMA_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
LLAMA_MERGES = 200
LLAMA_VOCAB = 512  # the tiny LLaMA's embedding rows; like the real 128320 > 128256, a little more than the tokenizer
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MERGES = 200
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

CORPUS = (
    "Describe the video by detailing the following aspects: 1. The main content and theme of the video.",
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.",
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.",
    "4. background environment, light, style and atmosphere.",
    "5. camera angles, movements, and transitions used in the video:",
    "system\n\nuser\n\nA cat walks on the grass in the sun. A dog runs along the beach at sunset.",
    "A woman dances in a red dress, the camera slowly zooms in. A man is riding a bicycle.",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable character table, in its canonical order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def learn_merges(words: list[tuple[str, ...]], count: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair, ties broken by the pair itself, so the
    result does not depend on hash order (the `tokenizers` trainer's tie-breaking does)."""
    freq: dict[tuple[str, ...], int] = {}
    for word in words:
        freq[word] = freq.get(word, 0) + 1
    merges = []
    for _ in range(count):
        pairs: dict[tuple[str, str], int] = {}
        for word, n in freq.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        freq = {_merge(word, best): n for word, n in freq.items()}
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def make_llama_tokenizer(out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    words = [tuple(piece) for text in CORPUS for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
    merges = learn_merges(words, LLAMA_MERGES)
    if ("Ċ", "Ċ") not in merges:
        raise RuntimeError("the tiny LLaMA tokenizer must learn '\\n\\n' as one token")
    vocab = list(bytes_to_unicode().values())
    vocab += [a + b for a, b in merges if a + b not in vocab]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIAL_TOKENS])
    bos = LLAMA_SPECIAL_TOKENS[0]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
            ),
        ]
    )
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": LLAMA_SPECIAL_TOKENS[0], "eos_token": LLAMA_SPECIAL_TOKENS[1]}
    write_json(out / "special_tokens_map.json", specials)
    write_json(
        out / "tokenizer_config.json",
        {**specials, "model_max_length": 131072, "padding_side": "right", "tokenizer_class": "PreTrainedTokenizerFast"},
    )
    return out


def make_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    pieces = [p for text in CORPUS for p, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
    merges = learn_merges([(*piece[:-1], piece[-1] + "</w>") for piece in pieces], CLIP_MERGES)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += [a + b for a, b in merges if a + b not in vocab]
    vocab += [CLIP_BOS, CLIP_EOS]
    write_json(out / "vocab.json", {token: i for i, token in enumerate(vocab)})
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": CLIP_EOS}
    write_json(out / "special_tokens_map.json", specials)
    write_json(out / "tokenizer_config.json", {**specials, "model_max_length": 77, "do_lower_case": True})
    return out


def clip_vocab_size(folder: str | Path) -> int:
    with open(Path(folder) / "vocab.json", encoding="utf-8") as f:
        return len(json.load(f))


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
