"""Text encoder 1 (LLaMA), text encoder 2 (CLIP-L) and their offline-first tokenizers, on tiny checkpoints."""

from __future__ import annotations

import shutil
import socket

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch

from hunyuan_model.text_encoder import (
    LLAMA_HIDDEN_STATE_INDEX,
    PROMPT_TEMPLATE,
    clip_config_from_shapes,
    crop_or_pad_yield_mask,
    encode_clip,
    encode_llama,
    encode_prompt_conds,
    llama_config_from_shapes,
    llama_crop_start,
    llama_prompt_prefix,
    load_text_encoder1,
    load_text_encoder2,
)
from hunyuan_model.tokenizers import (
    TOKENIZER1,
    TOKENIZER2,
    TokenizerUnavailableError,
    load_tokenizer1,
    load_tokenizer2,
    resolve_tokenizer_folder,
)
from tests.factory import dims
from tests.factory.text_encoders import llama_state_dict, make_text_encoder_files
from tests.factory.tokenizers import LLAMA_VOCAB
from utils.safetensors_utils import WeightFileError, save_safetensors

# HunyuanVideo's prompt template, verbatim.
SPEC_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video.2. The color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects.3. Actions, events, behaviors temporal relationships, physical movement changes of "
    "the objects.4. background environment, light, style and atmosphere.5. camera angles, movements, and transitions "
    "used in the video:<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
PROMPT = "A cat walks on the grass in the sun."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_text_encoder_files(tmp_path_factory.mktemp("text_encoders"))


@pytest.fixture(scope="module")
def tokenizer1(files):
    return load_tokenizer1(str(files.tokenizer1))


@pytest.fixture(scope="module")
def tokenizer2(files):
    return load_tokenizer2(str(files.tokenizer2))


@pytest.fixture(scope="module")
def llama(files):
    return load_text_encoder1(files.llama_comfy)


@pytest.fixture(scope="module")
def clip(files):
    return load_text_encoder2(files.clip_comfy)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt or hub download fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


# --- template and tokenizers ----------------------------------------------------------------------------------


def test_template_is_the_reference_text():
    assert PROMPT_TEMPLATE == SPEC_TEMPLATE
    assert llama_prompt_prefix() + "{}<|eot_id|>" == SPEC_TEMPLATE


def test_crop_start_is_the_prefix_token_count(tokenizer1):
    prefix_ids = tokenizer1(llama_prompt_prefix())["input_ids"]
    assert llama_crop_start(tokenizer1) == len(prefix_ids)
    assert prefix_ids[0] == tokenizer1.bos_token_id
    full_ids = tokenizer1(SPEC_TEMPLATE.format(PROMPT))["input_ids"]
    assert full_ids[: len(prefix_ids)] == prefix_ids  # the prompt starts exactly at crop_start
    tokens = tokenizer1.convert_ids_to_tokens(prefix_ids)
    after_headers = [tokens[i + 1] for i, t in enumerate(tokens) if t == "<|end_header_id|>"]
    assert after_headers == ["ĊĊ", "ĊĊ"]  # "\n\n" is one token after both headers, as in Llama-3's tokenizer.json
    assert len(tokenizer1) <= LLAMA_VOCAB


def test_custom_system_prompt_changes_the_crop(tokenizer1):
    custom = "Describe the scene."
    crop = llama_crop_start(tokenizer1, custom)
    assert crop == len(tokenizer1(llama_prompt_prefix(custom))["input_ids"])
    assert crop < llama_crop_start(tokenizer1)


def test_clip_tokenizer_pads_to_77_with_bos_and_eos(tokenizer2):
    ids = tokenizer2(PROMPT, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(ids) == 77
    assert ids[0] == tokenizer2.bos_token_id
    eos = tokenizer2.eos_token_id
    assert eos == max(tokenizer2.get_vocab().values())  # legacy pooling: argmax(input_ids) is the first EOS
    assert ids.index(eos) == max(range(77), key=lambda i: (ids[i], -i))


def test_local_tokenizers_make_no_network_access(files, no_network):
    assert load_tokenizer1(str(files.tokenizer1)).bos_token == "<|begin_of_text|>"
    assert load_tokenizer2(str(files.tokenizer2)).eos_token == "<|endoftext|>"
    assert load_tokenizer1(str(files.snapshot)) is not None  # a snapshot root given as --tokenizer1


def test_snapshot_text_encoder_supplies_its_tokenizers(files, no_network):
    snap = files.snapshot
    for encoder_path in (snap, snap / "text_encoder", snap / "text_encoder" / "model-00001-of-00004.safetensors"):
        assert resolve_tokenizer_folder(None, TOKENIZER1, encoder_path) == snap / "tokenizer"
    assert resolve_tokenizer_folder(None, TOKENIZER2, snap / "text_encoder_2") == snap / "tokenizer_2"
    # an explicit flag wins over the snapshot
    assert resolve_tokenizer_folder(str(files.tokenizer1), TOKENIZER1, snap) == files.tokenizer1


def test_offline_hub_tokenizer_error_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network access attempted"))
    with pytest.raises(TokenizerUnavailableError) as e1:
        load_tokenizer1(None)  # default: hunyuanvideo-community/HunyuanVideo, subfolder tokenizer
    message = str(e1.value)
    for part in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "--tokenizer1",
        "hunyuanvideo-community/HunyuanVideo/tree/main/tokenizer",
        "offline",
    ):
        assert part in message
    with pytest.raises(TokenizerUnavailableError) as e2:
        load_tokenizer2("hunyuanvideo-community/HunyuanVideo")
    for part in (
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "--tokenizer2",
        "HunyuanVideo/tree/main/tokenizer_2",
    ):
        assert part in str(e2.value)


def test_missing_local_tokenizer_folder_is_refused(tmp_path):
    with pytest.raises(TokenizerUnavailableError, match="--tokenizer1"):
        load_tokenizer1(str(tmp_path))  # exists but holds no tokenizer.json
    with pytest.raises(TokenizerUnavailableError, match="no such folder"):
        load_tokenizer2("./no/such/tokenizer_2")


# --- loading ----------------------------------------------------------------------------------------------------


def test_llama_config_from_shapes(llama):
    c = llama.config
    assert dims.config_sizes(c) == (dims.LLAMA_HIDDEN, dims.LLAMA_LAYERS, dims.LLAMA_INTERMEDIATE)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (1, dims.LLAMA_KV_HEADS, 128)
    assert (c.vocab_size, c.max_position_embeddings, c.rms_norm_eps) == (LLAMA_VOCAB, 8192, 1e-5)
    assert c.rope_parameters["rope_theta"] == 500000.0


def test_config_json_wins_over_shapes(files, tmp_path):
    folder = shutil.copytree(files.snapshot / "text_encoder", tmp_path / "text_encoder")
    text = (folder / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 3e-06')
    (folder / "config.json").write_text(text)
    assert load_text_encoder1(folder).config.rms_norm_eps == 3e-06


def test_single_file_keeps_its_dtype(tmp_path):
    path = tmp_path / "llama_fp32.safetensors"
    save_safetensors(llama_state_dict(dtype=torch.float32), path)
    assert load_text_encoder1(path).dtype == torch.float32


def test_clip_config_from_shapes(clip):
    c = clip.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (dims.CLIP_HIDDEN, dims.CLIP_LAYERS, 1)
    assert (c.max_position_embeddings, c.eos_token_id, c.pad_token_id, c.bos_token_id) == (77, 2, 1, 0)
    assert (c.hidden_act, c.layer_norm_eps) == ("quick_gelu", 1e-5)


# --- encoding ---------------------------------------------------------------------------------------------------


def test_llama_encoding_crops_template_and_pads_to_512(tokenizer1, tokenizer2, llama, clip):
    llama_vec, mask, pooled = encode_prompt_conds(PROMPT, llama, clip, tokenizer1, tokenizer2)
    n_tokens = len(tokenizer1(SPEC_TEMPLATE.format(PROMPT))["input_ids"]) - llama_crop_start(tokenizer1)
    assert llama_vec.shape == (1, 512, dims.LLAMA_HIDDEN) and llama_vec.dtype == torch.float16
    assert mask.shape == (1, 512) and mask.dtype == torch.bool
    assert int(mask.sum()) == n_tokens and bool(mask[0, :n_tokens].all())
    assert bool((llama_vec[0, n_tokens:] == 0).all()) and bool(llama_vec[0, :n_tokens].abs().sum() > 0)
    assert pooled.shape == (1, dims.CLIP_HIDDEN)


def test_llama_uses_third_from_last_hidden_state_of_the_prompt_tokens(tokenizer1, llama):
    """Independent of the padding: a forward hook on decoder layer n-3 (0-based) over the unpadded text."""
    captured = {}
    # hidden_states holds the embeddings and n layer outputs, so [-3] is the output of layer n-3 (0-based)
    assert LLAMA_HIDDEN_STATE_INDEX == -3
    layer = llama.layers[llama.config.num_hidden_layers - 3]
    handle = layer.register_forward_hook(lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        ids = tokenizer1(SPEC_TEMPLATE.format(PROMPT), return_tensors="pt")["input_ids"]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            llama(input_ids=ids)
    finally:
        handle.remove()
    with torch.autocast("cpu", dtype=torch.float16):
        vec = encode_llama(PROMPT, tokenizer1, llama)
    expected = captured["h"][:, llama_crop_start(tokenizer1) :]
    assert vec.shape == expected.shape
    torch.testing.assert_close(vec.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_custom_system_prompt_keeps_only_the_prompt_tokens(tokenizer1, llama):
    with torch.autocast("cpu", dtype=torch.float16):
        default = encode_llama(PROMPT, tokenizer1, llama)
        custom = encode_llama(PROMPT, tokenizer1, llama, custom_system_prompt="Describe the scene.")
    assert default.shape == custom.shape  # same prompt tokens, different context
    assert not torch.allclose(default.float(), custom.float())


def test_long_prompt_is_truncated_to_256_tokens(tokenizer1, llama):
    with torch.autocast("cpu", dtype=torch.float16):
        vec = encode_llama("a cat walks on the grass " * 200, tokenizer1, llama)
    assert vec.shape[1] == 256


def test_crop_or_pad_yield_mask():
    x = torch.randn(1, 5, 3)
    padded, mask = crop_or_pad_yield_mask(x, 8)
    assert padded.shape == (1, 8, 3) and mask.tolist() == [[True] * 5 + [False] * 3]
    assert torch.equal(padded[:, :5], x) and not padded[:, 5:].any()
    cropped, mask = crop_or_pad_yield_mask(torch.randn(1, 10, 3), 8)
    assert cropped.shape == (1, 8, 3) and bool(mask.all())


def test_clip_pooled_is_final_norm_state_at_argmax_input_id(tokenizer2, clip):
    ids = tokenizer2(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = clip(input_ids=ids)
    pooled = encode_clip(PROMPT, tokenizer2, clip)
    eos_position = int(ids[0].argmax())
    assert ids[0, eos_position] == tokenizer2.eos_token_id
    assert pooled.shape == (1, dims.CLIP_HIDDEN)
    torch.testing.assert_close(pooled, out.last_hidden_state[:, eos_position])


def test_fp8_llm_runs_and_stays_close(files, tokenizer1, llama):
    """Tolerance: relative L2 error below 15 % and cosine similarity above 0.99 against the fp16 encoder (measured
    about 5.5 % / 0.998 on the tiny model: e4m3 keeps 3 mantissa bits)."""
    fp8 = load_text_encoder1(files.llama_comfy, fp8_llm=True)
    assert fp8.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert fp8.embed_tokens.weight.dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.float16):
        reference = encode_llama(PROMPT, tokenizer1, llama).float()
        quantized = encode_llama(PROMPT, tokenizer1, fp8).float()
    assert quantized.shape == reference.shape and torch.isfinite(quantized).all()
    assert float((quantized - reference).norm() / reference.norm()) < 0.15
    assert float(torch.nn.functional.cosine_similarity(quantized.flatten(), reference.flatten(), dim=0)) > 0.99


# --- wrong files ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_tensor_loading(monkeypatch):
    import hunyuan_model.encoder_loader as loader_module

    monkeypatch.setattr(loader_module, "load_state_dict", lambda *a, **k: pytest.fail("tensors read before the check"))


def test_incomplete_llama_is_refused(tmp_path, no_tensor_loading):
    state = llama_state_dict()
    del state["layers.1.mlp.up_proj.weight"]
    save_safetensors(state, tmp_path / "partial.safetensors")
    with pytest.raises(WeightFileError, match=r"--text_encoder1 .*partial\.safetensors.*missing.*up_proj"):
        load_text_encoder1(tmp_path / "partial.safetensors")


# --- real sizes (shapes only, meta device) ----------------------------------------------------------------------


def _meta_shapes(model_cls, config) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return {k: tuple(v.shape) for k, v in model_cls(config).state_dict().items()}


def test_real_llama_shapes_give_the_reference_config():
    from transformers import LlamaModel

    h, kv, inter = 4096, 8 * 128, 14336
    shapes = {"embed_tokens.weight": (128320, h), "norm.weight": (h,)}
    for n in range(32):
        p = f"layers.{n}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    c = llama_config_from_shapes(shapes)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (
        32,
        32,
        8,
        inter,
    )
    assert (c.bos_token_id, c.eos_token_id, c.vocab_size) == (128000, 128001, 128320)
    assert _meta_shapes(LlamaModel, c) == shapes


def test_real_clip_shapes_give_the_reference_config():
    from transformers import CLIPTextModel

    h, inter = 768, 3072
    shapes = {
        "embeddings.token_embedding.weight": (49408, h),
        "embeddings.position_embedding.weight": (77, h),
        "final_layer_norm.weight": (h,),
        "final_layer_norm.bias": (h,),
    }
    for n in range(12):
        p = f"encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{p}self_attn.{proj}.weight": (h, h), f"{p}self_attn.{proj}.bias": (h,)})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{p}{norm}.weight": (h,), f"{p}{norm}.bias": (h,)})
        shapes.update({f"{p}mlp.fc1.weight": (inter, h), f"{p}mlp.fc1.bias": (inter,)})
        shapes.update({f"{p}mlp.fc2.weight": (h, inter), f"{p}mlp.fc2.bias": (h,)})
    c = clip_config_from_shapes(shapes)
    assert (c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size) == (12, 12, inter, 49408)
    assert _meta_shapes(CLIPTextModel, c) == shapes
