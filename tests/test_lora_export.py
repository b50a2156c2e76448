"""LoRA export for other tools: diffusers' own loader, a tensors-only loader, round trips, --inspect, refusals.

diffusers is a test dependency only: its `HunyuanVideoFramepackTransformer3DModel` is built with the tiny config and
loaded with the same tiny weights as our DiT (the factory writes the real key layout), then the LoRA goes through
`HunyuanVideoFramepackPipeline.lora_state_dict` / `load_lora_into_transformer` and `fuse_lora`.
"""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import convert_lora
from networks.lora_convert import convert_to_framepack, to_diffusers
from networks.lora_framepack import module_path
from networks.lora_merge import merge_lora_files
from tests.factory.dit import diffusers_config, tiny_dit_config, tiny_dit_state_dict
from tests.factory.lora import framepack_lora
from tests.test_lora import one_thread, tiny_model  # noqa: F401 (autouse fixture)
from tests.test_lora_formats import write

CONFIG = tiny_dit_config()


def mixed_lora(dtype=torch.bfloat16, seed=1) -> dict:
    """Rank 4 / alpha 2 on most modules (AdaLN Linears included), rank 8 / alpha 16 on the single blocks, and one
    module with its own alpha: every header pattern gets used."""
    sd = framepack_lora(CONFIG, include_norm=True, rank=4, alpha=2.0, dtype=dtype, seed=seed)
    rank8 = framepack_lora(CONFIG, rank=8, alpha=16.0, dtype=dtype, seed=seed + 1)
    sd.update({k: v for k, v in rank8.items() if k.startswith("lora_unet_single")})
    sd["lora_unet_transformer_blocks_1_ff_net_2.alpha"] = torch.tensor(0.5, dtype=dtype)
    return sd


def export(tmp_path, src, name, *flags):
    out = str(tmp_path / name)
    assert convert_lora.main(["--input", src, "--output", out, "--target", "other", *flags]) == 0
    return out


def our_merge(path, multiplier=1.0, dtype=torch.float32):
    model = tiny_model(dtype)
    merge_lora_files(model, [path], multiplier)
    return model.state_dict()


def diffusers_transformer(dit_state_dict=None):
    """diffusers' FramePack transformer with the tiny config and the tiny DiT's weights (same key layout)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    config = {k: v for k, v in diffusers_config(CONFIG).items() if k != "_class_name"}
    with torch.device("meta"):
        transformer = HunyuanVideoFramepackTransformer3DModel(**config)
    weights = dit_state_dict if dit_state_dict is not None else tiny_dit_state_dict(0, CONFIG, dtype=torch.float32)
    transformer.load_state_dict(weights, assign=True)
    return transformer


def diffusers_fuse(path, lora_scale=1.0, dit_state_dict=None) -> dict:
    """diffusers' FramePack LoRA loader on diffusers' FramePack transformer, fused."""
    from diffusers import HunyuanVideoFramepackPipeline

    transformer = diffusers_transformer(dit_state_dict)
    state_dict, metadata = HunyuanVideoFramepackPipeline.lora_state_dict(path, return_lora_metadata=True)
    HunyuanVideoFramepackPipeline.load_lora_into_transformer(state_dict, transformer=transformer, metadata=metadata)
    transformer.fuse_lora(lora_scale=lora_scale)
    transformer.unload_lora()
    return transformer.state_dict()


def tensors_only_fuse(path) -> dict:
    """What ComfyUI-FramePackWrapper and FramePack-Studio do: read the tensors, ignore the header, W += B @ A."""
    weights = tiny_dit_state_dict(0, CONFIG, dtype=torch.float32)
    lora = load_file(path)
    for key, a in lora.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            weights[f"{module}.weight"] = weights[f"{module}.weight"] + b.float() @ a.float()
    return weights


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---- the default export is right everywhere -----------------------------------------------------------------------


def test_default_export_folds_alpha_into_float32_factors_with_a_consistent_header(tmp_path):
    sd = mixed_lora()
    exported = export(tmp_path, write(tmp_path, "ours.safetensors", sd, {"ss_network_dim": "4"}), "x.safetensors")
    with safe_open(exported, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert len(tensors) == 2 * 40 and all("lora" in k for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert metadata["ss_network_dim"] == "4"
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (4, 4.0)  # alpha = rank: scale 1
    assert config["transformer.rank_pattern"] == config["transformer.alpha_pattern"]
    assert config["transformer.rank_pattern"]["single_transformer_blocks.0.proj_mlp"] == 8
    assert json.loads(metadata["lora_folded_alphas"])["transformer_blocks.1.ff.net.2"] == 0.5
    for name, path, scale in (
        ("lora_unet_transformer_blocks_0_attn_to_q", "transformer_blocks.0.attn.to_q", 2 / 4),
        ("lora_unet_transformer_blocks_1_ff_net_2", "transformer_blocks.1.ff.net.2", 0.5 / 4),
        ("lora_unet_single_transformer_blocks_1_proj_out", "single_transformer_blocks.1.proj_out", 16 / 8),
    ):
        b, a = tensors[f"transformer.{path}.lora_B.weight"], tensors[f"transformer.{path}.lora_A.weight"]
        product = sd[f"{name}.lora_up.weight"].float() @ sd[f"{name}.lora_down.weight"].float() * scale
        torch.testing.assert_close(b @ a, product, atol=1e-6, rtol=1e-6)


def test_diffusers_loader_fuses_our_default_export_to_our_merge(tmp_path, caplog):
    src = write(tmp_path, "ours.safetensors", mixed_lora())
    exported = export(tmp_path, src, "x.safetensors")
    ours = our_merge(src)
    assert max_abs_diff(ours, tiny_dit_state_dict(0, CONFIG, dtype=torch.float32)) > 0.05  # the LoRA does something
    assert max_abs_diff(diffusers_fuse(exported), ours) < 1e-6  # float32 rounding of the folded factors
    # a multiplier is diffusers' lora_scale
    assert max_abs_diff(diffusers_fuse(exported, lora_scale=0.7), our_merge(src, 0.7)) < 1e-6
    # and our own merge of the export is that of the musubi file, bit for bit (the alphas are divided back out)
    assert max_abs_diff(our_merge(exported, 0.7), our_merge(src, 0.7)) == 0.0


def test_a_tensors_only_loader_gets_the_same_weights_from_the_default_export(tmp_path):
    src = write(tmp_path, "ours.safetensors", mixed_lora())
    ours = our_merge(src)
    assert max_abs_diff(tensors_only_fuse(export(tmp_path, src, "x.safetensors")), ours) < 1e-6
    # The header-only form is what made such loaders apply the delta at the wrong strength (here alpha 2 at rank 4:
    # 2x too strong on the rank-4 modules).
    header_only = tensors_only_fuse(export(tmp_path, src, "h.safetensors", "--no_fold_alpha"))
    base = tiny_dit_state_dict(0, CONFIG, dtype=torch.float32)
    key = "transformer_blocks.0.attn.to_q.weight"
    torch.testing.assert_close(header_only[key] - base[key], 2.0 * (ours[key] - base[key]), atol=1e-5, rtol=1e-4)
    assert max_abs_diff(diffusers_fuse(str(tmp_path / "h.safetensors")), ours) < 1e-6  # diffusers reads the header


def test_no_fold_alpha_writes_the_header_only_form(tmp_path):
    sd = framepack_lora(CONFIG, rank=4, alpha=2.0)
    sd["lora_unet_single_transformer_blocks_1_proj_out.alpha"] = torch.tensor(8.0, dtype=torch.bfloat16)
    exported = export(tmp_path, write(tmp_path, "ours.safetensors", sd), "x.safetensors", "--no_fold_alpha")
    with safe_open(exported, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert len(tensors) == 2 * 34
    for key, tensor in sd.items():
        if not key.endswith("alpha"):
            name, _, kind = key.partition(".")
            peft = f"transformer.{module_path(name)}.{'lora_A' if 'down' in kind else 'lora_B'}.weight"
            assert tensors[peft].dtype == tensor.dtype and torch.equal(tensors[peft], tensor), key
    config = json.loads(metadata.pop("lora_adapter_metadata"))
    assert metadata == {"lora_alpha_dtype": "bfloat16"}
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (4, 2.0)
    assert (config["transformer.rank_pattern"], config["transformer.alpha_pattern"]) == (
        {},
        {"single_transformer_blocks.1.proj_out": 8.0},
    )
    assert len(config["transformer.target_modules"]) == 34


def test_a_lora_written_by_diffusers_merges_like_the_original(tmp_path):
    """diffusers' own save_lora_weights output (PEFT keys, LoraConfig in the header) is read at its strength."""
    from diffusers import HunyuanVideoFramepackPipeline
    from peft.utils import get_peft_model_state_dict

    src = write(tmp_path, "ours.safetensors", mixed_lora())
    exported = export(tmp_path, src, "h.safetensors", "--no_fold_alpha")
    transformer = diffusers_transformer()
    state_dict, metadata = HunyuanVideoFramepackPipeline.lora_state_dict(exported, return_lora_metadata=True)
    HunyuanVideoFramepackPipeline.load_lora_into_transformer(state_dict, transformer=transformer, metadata=metadata)
    (adapter,) = transformer.peft_config
    HunyuanVideoFramepackPipeline.save_lora_weights(
        tmp_path / "by_diffusers",
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=adapter),
        transformer_lora_adapter_metadata=transformer.peft_config[adapter].to_dict(),
    )
    written = str(tmp_path / "by_diffusers" / "pytorch_lora_weights.safetensors")
    assert max_abs_diff(our_merge(written), our_merge(src)) == 0.0


# ---- round trips --------------------------------------------------------------------------------------------------


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("flags", [[], ["--no_fold_alpha"]], ids=["folded", "header_only"])
def test_export_then_import_gives_back_our_file(dtype, flags, tmp_path):
    sd = mixed_lora(dtype)
    sd["lora_unet_single_transformer_blocks_0_attn_to_k.alpha"] = torch.tensor(5.0, dtype=dtype)
    metadata = {"ss_network_dim": "4", "modelspec.title": "x"}
    src = write(tmp_path, "ours.safetensors", sd, metadata)
    back = str(tmp_path / "back.safetensors")
    exported = export(tmp_path, src, "x.safetensors", *flags)
    assert convert_lora.main(["--input", exported, "--output", back, "--target", "default"]) == 0
    result, back_metadata = read(back)
    assert back_metadata == metadata
    assert set(result) == set(sd)
    for key, tensor in sd.items():
        assert result[key].dtype == tensor.dtype, key
        if flags or dtype == torch.bfloat16 or key.endswith("alpha"):
            # bf16 factors survive the float32 fold and unfold exactly; the header-only form copies them
            assert torch.equal(result[key], tensor), key
        else:
            torch.testing.assert_close(result[key], tensor, atol=0, rtol=3e-7)


def test_export_dtype_and_target_alias(tmp_path):
    src = write(tmp_path, "ours.safetensors", mixed_lora(torch.float32))
    as_bf16 = export(tmp_path, src, "b.safetensors", "--dtype", "bfloat16")
    assert {t.dtype for t in read(as_bf16)[0].values()} == {torch.bfloat16}
    # bf16 rounding of the folded factors only
    assert 0 < max_abs_diff(our_merge(as_bf16), our_merge(src)) < 2e-3
    alias = str(tmp_path / "alias.safetensors")
    assert convert_lora.main(["--input", src, "--output", alias, "--target", "diffusers"]) == 0
    a, b = read(alias)[0], read(export(tmp_path, src, "other.safetensors"))[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    tensors, _ = to_diffusers(convert_to_framepack(load_file(src)).state_dict, prefix="diffusion_model")
    assert all(k.startswith("diffusion_model.") for k in tensors)


# ---- import: logging and refusals ---------------------------------------------------------------------------------


def test_loading_logs_format_modules_effective_scale_and_unmatched_keys(tmp_path, caplog):
    src = write(tmp_path, "ours.safetensors", framepack_lora(CONFIG, rank=4, alpha=2.0, seed=3))
    tensors, metadata = read(export(tmp_path, src, "x.safetensors"))
    tensors["transformer.proj_out.lora_A.weight"] = torch.zeros(4, 128)
    tensors["transformer.proj_out.lora_B.weight"] = torch.zeros(64, 4)
    path = write(tmp_path, "extra.safetensors", tensors, metadata)
    with caplog.at_level(logging.INFO):
        (report,) = merge_lora_files(tiny_model(), [path], 0.7)
    assert f"{path}: detected format diffusers/PEFT FramePack (70 keys)" in caplog.text
    assert "applied 34 modules, effective scale alpha 2 / rank 4 x multiplier 0.7 = 0.35" in caplog.text
    assert "(alpha from folded into the factors (header lora_folded_alphas))" in caplog.text
    assert "2 keys match no module of this DiT" in caplog.text and "transformer.proj_out.lora_A.weight" in caplog.text
    assert len(report.merged) == 34 and report.effective_scales == dict.fromkeys(report.merged, pytest.approx(0.35))


@pytest.mark.parametrize(
    "name, keys, message",
    [
        ("wan_diffusers", ["transformer.blocks.0.attn1.to_q", "transformer.blocks.0.ffn.0"], "no key matches a module"),
        (
            "wan_musubi",
            ["lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_cross_attn_k"],
            "no key matches a module",
        ),
        (
            "sd_kohya",
            ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "lora_te_text_model_encoder_0"],
            "no key matches a module",
        ),
        ("random", ["model.layers.0", "foo.bar"], "no key is in a LoRA layout"),
    ],
)
def test_loras_for_other_models_and_random_files_are_refused_by_name(name, keys, message, tmp_path):
    sd = {}
    for key in keys:
        if name == "random":
            sd[f"{key}.weight"] = torch.zeros(2, 2)
        elif key.startswith("transformer."):
            sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = torch.zeros(2, 8), torch.zeros(8, 2)
        else:
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = torch.zeros(2, 8), torch.zeros(8, 2)
            sd[f"{key}.alpha"] = torch.tensor(1.0)
    path = write(tmp_path, f"{name}.safetensors", sd)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as refused:
        merge_lora_files(model, [path])
    text = str(refused.value)
    assert text.startswith(f"{path}: {message}")
    assert sorted(sd)[0] in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(SystemExit) as failed:
        convert_lora.main(["--input", path, "--output", str(tmp_path / "o.safetensors"), "--target", "other"])
    assert failed.value.code == 2


# ---- --inspect ----------------------------------------------------------------------------------------------------


def inspect(path, capsys, *flags):
    assert convert_lora.main(["--inspect", path, *flags]) == 0
    return capsys.readouterr().out


def verdicts(report: str) -> dict[str, str]:
    tools = ("diffusers:", "Kijai ComfyUI-FramePackWrapper:", "FramePack-Studio:")
    return {
        line.split(":")[0].strip(): line.split(":", 1)[1].split()[0]
        for line in report.splitlines()
        if line.strip().startswith(tools)
    }


def test_inspect_reports_format_rank_alpha_scale_blocks_dtype_and_where_it_loads_right(tmp_path, capsys):
    sd = framepack_lora(CONFIG, rank=4, alpha=2.0, seed=5)
    src = write(tmp_path, "ours.safetensors", sd, {"ss_network_dim": "4", "ss_network_alpha": "2"})
    report = inspect(src, capsys, "--multiplier", "0.8")
    assert "format:          musubi FramePack 102 (keys)" in report
    assert "modules:         34 (double-stream blocks 24, single-stream blocks 10)" in report
    assert "rank:            4\n" in report and "alpha:           2  [from `.alpha` keys]" in report
    assert "header ss_network_alpha: 2\n" in report
    assert "effective scale: alpha 2 / rank 4 x multiplier 0.8 = 0.4" in report
    assert "dtype:           bfloat16 102 (tensors)" not in report  # alphas are not counted as factors
    assert "dtype:           bfloat16 68 (tensors)" in report
    assert verdicts(report) == {"diffusers": "no", "Kijai ComfyUI-FramePackWrapper": "yes", "FramePack-Studio": "no"}

    folded = inspect(export(tmp_path, src, "x.safetensors"), capsys)
    assert "format:          diffusers/PEFT FramePack 68 (keys)" in folded
    assert "effective scale: alpha 4 / rank 4 x multiplier 1 = 1" in folded
    assert "folded:          yes" in folded and "original alpha 2" in folded
    assert "dtype:           float32 68 (tensors)" in folded
    assert set(verdicts(folded).values()) == {"yes"}

    header_only = inspect(export(tmp_path, src, "h.safetensors", "--no_fold_alpha"), capsys)
    assert "effective scale: alpha 2 / rank 4 x multiplier 1 = 0.5" in header_only
    assert verdicts(header_only) == {
        "diffusers": "yes",
        "Kijai ComfyUI-FramePackWrapper": "no",
        "FramePack-Studio": "no",
    }
    assert "2x too strong" in header_only

    with_norms = framepack_lora(CONFIG, include_norm=True, rank=4, alpha=2.0, seed=5)
    report = inspect(write(tmp_path, "norms.safetensors", with_norms), capsys)
    assert "40 (double-stream blocks 28, single-stream blocks 12, of which AdaLN modulation Linears 6)" in report
    assert verdicts(report)["Kijai ComfyUI-FramePackWrapper"] == "partly" and "norm1.context.linear" in report


def test_convert_script_help_and_flag_errors(capsys):
    with pytest.raises(SystemExit):
        convert_lora.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--input", "--output", "--target", "--prefix", "--no_fold_alpha", "--dtype", "--inspect", "diffusers"):
        assert flag in help_text
    with pytest.raises(SystemExit):
        convert_lora.parse_args(["--input", "a.safetensors"])
    assert "--output, --target required (or use --inspect FILE)" in capsys.readouterr().err
