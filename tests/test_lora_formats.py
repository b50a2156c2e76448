"""LoRA at inference: every file layout is detected and merged, filters, reports, refusals, merged-model save."""

import json
import logging
import sys
import types

import pytest
import torch

from frame_pack.dit_loader import load_packed_model
from networks import lora_framepack
from networks.lora_convert import (
    DIFFUSERS_FRAMEPACK,
    DIFFUSION_PIPE_HUNYUAN,
    MUSUBI_FRAMEPACK,
    MUSUBI_HUNYUAN,
    LoraFormatError,
    convert_to_framepack,
)
from networks.lora_merge import LycorisUnavailableError, merge_lora_files, save_merged_model
from tests.factory.dit import tiny_dit_config
from tests.factory.lora import framepack_lora, hunyuan_lora, hunyuan_to_diffusion_pipe, to_peft
from tests.test_dit import section_inputs
from tests.test_lora import one_thread, tiny_model  # noqa: F401 (autouse fixture)
from utils.safetensors_utils import save_safetensors

CONFIG = tiny_dit_config()


def write(tmp_path, name, sd, metadata=None):
    path = tmp_path / name
    save_safetensors(sd, path, metadata)
    return str(path)


def expected_merge(model, musubi_sd, multiplier):
    """The base weights plus m * up @ down * alpha / rank for each module of a musubi FramePack state dict."""
    params = dict(model.named_parameters())
    expected = {k: v.detach().clone() for k, v in params.items()}
    for key in musubi_sd:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.split(".")[0]
        down, up = musubi_sd[key].float(), musubi_sd[f"{name}.lora_up.weight"].float()
        alpha = float(musubi_sd.get(f"{name}.alpha", down.shape[0]))
        weight = f"{lora_framepack.module_path(name)}.weight"
        expected[weight] = (params[weight].float() + multiplier * (up @ down) * alpha / down.shape[0]).to(
            params[weight].dtype
        )
    return expected


def assert_weights(model, expected, atol=1e-6):
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, expected[name], atol=atol, rtol=0, msg=name)


# ---- every layout ---------------------------------------------------------------------------------------------------


def layouts():
    """(file name, state dict, metadata, expected format, the musubi FramePack LoRA it must equal)."""
    fp = framepack_lora(CONFIG, include_norm=True, rank=4, alpha=2.0, dtype=torch.float32, seed=1)
    hv, hv_expected = hunyuan_lora(CONFIG, rank=4, alpha=2.0, dtype=torch.float32, seed=2)
    dp = hunyuan_to_diffusion_pipe(hv)
    dp_expected = {k: v for k, v in hv_expected.items() if not k.endswith("alpha")}  # alpha = rank
    peft_no_alpha = {k: v for k, v in fp.items() if not k.endswith("alpha")}
    return [
        ("musubi_fp", fp, None, MUSUBI_FRAMEPACK, fp),
        ("musubi_hv", hv, None, MUSUBI_HUNYUAN, hv_expected),
        ("diffusion_pipe_hv", dp, None, DIFFUSION_PIPE_HUNYUAN, dp_expected),
        (
            "diffusion_pipe_hv_transformer_prefix",
            hunyuan_to_diffusion_pipe(hv, "transformer"),
            None,
            DIFFUSION_PIPE_HUNYUAN,
            dp_expected,
        ),
        ("peft_fp_alpha_keys", to_peft(fp, CONFIG, alpha_keys=True), None, DIFFUSERS_FRAMEPACK, fp),
        ("peft_fp_no_alpha", to_peft(fp, CONFIG), None, DIFFUSERS_FRAMEPACK, peft_no_alpha),
        (
            "peft_fp_adapter_metadata",
            to_peft(fp, CONFIG),
            {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 2.0})},
            DIFFUSERS_FRAMEPACK,
            fp,
        ),
    ]


@pytest.mark.parametrize("case", layouts(), ids=lambda c: c[0])
def test_each_layout_is_detected_and_merges_like_its_musubi_equivalent(case, tmp_path, caplog):
    name, sd, metadata, fmt, musubi_equivalent = case
    path = write(tmp_path, f"{name}.safetensors", sd, metadata)
    model = tiny_model()
    expected = expected_merge(model, musubi_equivalent, 0.7)
    with caplog.at_level(logging.INFO):
        (report,) = merge_lora_files(model, [path], 0.7)
    assert report.formats == {fmt: len(sd)}
    assert f"detected format {fmt}" in caplog.text
    assert not report.unmatched
    assert len(report.merged) == 40  # 34 target Linears + the 6 AdaLN Linears every layout here carries
    assert_weights(model, expected)


def test_fused_hunyuan_projections_split_into_hand_built_merged_weights(tmp_path):
    hv, _ = hunyuan_lora(CONFIG, rank=3, alpha=6.0, dtype=torch.float32, seed=3)
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora_files(model, [write(tmp_path, "hv.safetensors", hv)], 1.0)

    d, h = 128, 512
    for block_list, fused, parts in (
        (
            "double_blocks",
            "img_attn_qkv",
            [
                ("transformer_blocks.1.attn.to_q", 0, d),
                ("transformer_blocks.1.attn.to_k", d, 2 * d),
                ("transformer_blocks.1.attn.to_v", 2 * d, 3 * d),
            ],
        ),
        (
            "double_blocks",
            "txt_attn_qkv",
            [("transformer_blocks.1.attn.add_q_proj", 0, d), ("transformer_blocks.1.attn.add_v_proj", 2 * d, 3 * d)],
        ),
        (
            "single_blocks",
            "linear1",
            [
                ("single_transformer_blocks.1.attn.to_k", d, 2 * d),
                ("single_transformer_blocks.1.proj_mlp", 3 * d, 3 * d + h),
            ],
        ),
    ):
        down = hv[f"lora_unet_{block_list}_1_{fused}.lora_down.weight"]
        up = hv[f"lora_unet_{block_list}_1_{fused}.lora_up.weight"]
        for path, start, stop in parts:
            hand = base[f"{path}.weight"] + up[start:stop] @ down * (6.0 / 3)
            torch.testing.assert_close(model.state_dict()[f"{path}.weight"], hand, atol=1e-6, rtol=0)


def test_full_size_split_rows_are_3072_each_and_12288_for_the_mlp():
    rank = 1
    sd = {}
    for name, rows in (("double_blocks_0_img_attn_qkv", 9216), ("single_blocks_0_linear1", 21504)):
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.zeros(rank, 3072)
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.arange(rows, dtype=torch.float32)[:, None]
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(1.0)
    out = convert_to_framepack(sd).state_dict
    first_row = {k.split(".")[0]: (v.shape[0], int(v[0, 0])) for k, v in out.items() if k.endswith("lora_up.weight")}
    assert first_row == {
        "lora_unet_transformer_blocks_0_attn_to_q": (3072, 0),
        "lora_unet_transformer_blocks_0_attn_to_k": (3072, 3072),
        "lora_unet_transformer_blocks_0_attn_to_v": (3072, 6144),
        "lora_unet_single_transformer_blocks_0_attn_to_q": (3072, 0),
        "lora_unet_single_transformer_blocks_0_attn_to_k": (3072, 3072),
        "lora_unet_single_transformer_blocks_0_attn_to_v": (3072, 6144),
        "lora_unet_single_transformer_blocks_0_proj_mlp": (12288, 9216),
    }


def test_wrong_model_size_is_a_clear_error(tmp_path):
    sd = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 3072),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 2),
    }
    with pytest.raises(LoraFormatError, match="9216 rows.*needs 384"):
        merge_lora_files(tiny_model(), [write(tmp_path, "big.safetensors", sd)])
    # One module fits, one does not: the file is refused before any weight changes.
    sd = framepack_lora(CONFIG, rank=2, dtype=torch.float32)
    sd["lora_unet_transformer_blocks_1_attn_to_q.lora_down.weight"] = torch.ones(2, 3072)
    sd["lora_unet_transformer_blocks_1_attn_to_q.lora_up.weight"] = torch.ones(3072, 2)
    sd["lora_unet_transformer_blocks_1_attn_to_k.lora_up.weight"] = torch.ones(128, 3)  # rank 3 against 2
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = write(tmp_path, "big2.safetensors", sd)
    with pytest.raises(LoraFormatError) as refused:
        merge_lora_files(model, [path])
    message = str(refused.value)
    assert message.startswith(f"{path}: 2 of 34 modules have shapes that do not fit this DiT")
    assert "lora_unet_transformer_blocks_1_attn_to_q.lora_down.weight: down (2, 3072) / up (3072, 2)" in message
    assert "for a Linear 128 -> 128" in message and "rank 2 in down but 3 in up" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- merge behaviour ----------------------------------------------------------------------------------------------


def outputs_runtime_and_merged(path, sd, dtype):
    """(base output, output with the LoRA modules applied at run time, output of the merged model)."""
    kw = section_inputs(h=4, w=4, clean=False, dtype=dtype)
    runtime = tiny_model(dtype)
    with torch.no_grad():
        base_out = runtime(**kw)
    network = lora_framepack.create_arch_network_from_weights(0.8, sd, unet=runtime, for_inference=True)
    network.load_state_dict(sd)
    network.apply_to(None, runtime)
    merged = tiny_model(dtype)
    merge_lora_files(merged, [path], [0.8])
    with torch.no_grad():
        return base_out, runtime(**kw), merged(**kw)


def test_merging_equals_applying_the_lora_modules_at_run_time(tmp_path):
    sd = framepack_lora(CONFIG, include_norm=True, rank=4, alpha=2.0, dtype=torch.bfloat16, seed=4)
    path = write(tmp_path, "lora.safetensors", sd)

    base32, runtime32, merged32 = outputs_runtime_and_merged(path, sd, torch.float32)
    assert (runtime32 - base32).abs().max() > 0.1
    torch.testing.assert_close(merged32, runtime32, atol=1e-4, rtol=0)

    # In bf16 the merged weights are rounded once more; that stays below what bf16 itself does to the model.
    base16, runtime16, merged16 = outputs_runtime_and_merged(path, sd, torch.bfloat16)
    bf16_noise = (base16 - base32).abs().max()
    assert (merged16 - runtime16).abs().max() < 1.5 * bf16_noise

    # The network's own merge (the trainer's --base_weights path) is the same computation.
    merged = tiny_model(torch.bfloat16)
    merge_lora_files(merged, [path], [0.8])
    via_network = tiny_model(torch.bfloat16)
    network = lora_framepack.create_arch_network_from_weights(0.8, sd, unet=via_network, for_inference=True)
    network.merge_to(None, via_network, sd)
    assert all(torch.equal(a, b) for a, b in zip(via_network.state_dict().values(), merged.state_dict().values()))


def test_multiplier_zero_leaves_weights_bit_identical(tmp_path):
    sd = framepack_lora(CONFIG, rank=4, alpha=2.0)
    model = tiny_model(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora_files(model, [write(tmp_path, "a.safetensors", sd)], 0.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_multipliers_one_for_all_or_one_per_lora(tmp_path):
    a = write(tmp_path, "a.safetensors", framepack_lora(CONFIG, seed=5, dtype=torch.float32))
    b = write(tmp_path, "b.safetensors", framepack_lora(CONFIG, seed=6, dtype=torch.float32))
    reports = merge_lora_files(tiny_model(), [a, b], 0.5)
    assert [r.multiplier for r in reports] == [0.5, 0.5]
    assert [r.multiplier for r in merge_lora_files(tiny_model(), [a, b])] == [1.0, 1.0]
    assert [r.multiplier for r in merge_lora_files(tiny_model(), [a, b], [0.2, 0.3])] == [0.2, 0.3]
    with pytest.raises(ValueError, match="3 multipliers given for 2 LoRA files"):
        merge_lora_files(tiny_model(), [a, b], [1, 2, 3])


def test_include_and_exclude_patterns_keep_and_drop_the_right_modules(tmp_path):
    sd = framepack_lora(CONFIG, dtype=torch.float32)
    a, b = write(tmp_path, "a.safetensors", sd), write(tmp_path, "b.safetensors", sd)
    reports = merge_lora_files(
        tiny_model(), [a, b], include_patterns=[r"single_transformer_blocks", None], exclude_patterns=[r"proj_mlp"]
    )
    assert sorted(reports[0].merged) == sorted(
        f"lora_unet_single_transformer_blocks_{i}_{c}"
        for i in range(2)
        for c in ("attn_to_q", "attn_to_k", "attn_to_v", "proj_out")
    )
    assert len(reports[1].merged) == 34  # the second LoRA has no patterns
    assert reports[0].filtered_out == 3 * (34 - 8)

    model = tiny_model()
    only = {k: v for k, v in sd.items() if k.startswith("lora_unet_single") and "proj_mlp" not in k}
    expected = expected_merge(model, only, 1.0)
    merge_lora_files(model, [a], include_patterns="single_transformer_blocks", exclude_patterns="proj_mlp")
    assert_weights(model, expected)


def test_keys_matching_no_dit_module_are_reported(tmp_path, caplog):
    sd = framepack_lora(CONFIG, dtype=torch.float32)
    extra = framepack_lora(tiny_dit_config(num_layers=3), dtype=torch.float32)
    sd.update({k: v for k, v in extra.items() if "transformer_blocks_2_attn_to_q" in k})
    sd["lora_unet_proj_out.lora_down.weight"] = torch.zeros(4, 128)
    sd["lora_unet_proj_out.lora_up.weight"] = torch.zeros(64, 4)
    sd["some_other_tensor"] = torch.zeros(3)
    with caplog.at_level(logging.WARNING):
        (report,) = merge_lora_files(tiny_model(), [write(tmp_path, "x.safetensors", sd)])
    assert sorted(report.unmatched) == sorted(
        [
            "some_other_tensor",
            "lora_unet_transformer_blocks_2_attn_to_q.lora_down.weight",
            "lora_unet_transformer_blocks_2_attn_to_q.lora_up.weight",
            "lora_unet_transformer_blocks_2_attn_to_q.alpha",
            "lora_unet_proj_out.lora_down.weight",
            "lora_unet_proj_out.lora_up.weight",
        ]
    )
    assert "6 keys match no module of this DiT" in caplog.text and "lora_unet_proj_out" in caplog.text
    assert len(report.merged) == 34


def test_unknown_layouts_lycoris_files_and_missing_lycoris_get_clear_errors(tmp_path):
    unknown = {"model.layers.0.weight": torch.zeros(2), "foo.bar": torch.zeros(1)}
    with pytest.raises(LoraFormatError, match="no key is in a LoRA layout.*foo.bar, model.layers.0.weight"):
        merge_lora_files(tiny_model(), [write(tmp_path, "u.safetensors", unknown)])
    dit_like = {"x_embedder.proj.weight": torch.zeros(1)}
    with pytest.raises(LoraFormatError, match="looks like a FramePack DiT"):
        merge_lora_files(tiny_model(), [write(tmp_path, "d.safetensors", dit_like)])
    loha = {"lora_unet_transformer_blocks_0_attn_to_q.hada_w1_a": torch.zeros(2, 2)}
    path = write(tmp_path, "loha.safetensors", loha)
    with pytest.raises(LoraFormatError, match="--lycoris"):
        merge_lora_files(tiny_model(), [path])
    with pytest.raises(LycorisUnavailableError, match="pip install lycoris-lora"):
        merge_lora_files(tiny_model(), [path], lycoris=True)
    # musubi naming for another model (here Wan's blocks): the layout is known, but nothing fits this DiT.
    wan = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(2, 8)}
    wan["lora_unet_blocks_0_self_attn_q.lora_up.weight"] = torch.zeros(8, 2)
    with pytest.raises(LoraFormatError, match="no key matches a module of this DiT.*lora_unet_blocks_0_self_attn_q"):
        merge_lora_files(tiny_model(), [write(tmp_path, "wan.safetensors", wan)])
    with pytest.raises(ValueError, match=r"invalid include pattern '\('"):
        merge_lora_files(tiny_model(), [path], include_patterns=["("])


def test_lycoris_files_go_to_the_lycoris_library_unconverted(tmp_path, monkeypatch):
    calls = []

    class FakeNetwork:
        def merge_to(self, text_encoders, unet, weights_sd, dtype=None, device=None):
            calls.append(("merge_to", text_encoders, unet, sorted(weights_sd), dtype, device))

    def create_network_from_weights(**kwargs):
        calls.append(("create", kwargs))
        return FakeNetwork(), kwargs["weights_sd"]

    lycoris = types.ModuleType("lycoris")
    lycoris.kohya = types.SimpleNamespace(create_network_from_weights=create_network_from_weights)
    monkeypatch.setitem(sys.modules, "lycoris", lycoris)
    monkeypatch.setitem(sys.modules, "lycoris.kohya", lycoris.kohya)

    loha = {"lora_unet_transformer_blocks_0_attn_to_q.hada_w1_a": torch.zeros(2, 2)}
    loha["lora_unet_transformer_blocks_0_attn_to_k.hada_w1_a"] = torch.zeros(2, 2)
    model = tiny_model()
    (report,) = merge_lora_files(
        model, [write(tmp_path, "loha.safetensors", loha)], 0.6, exclude_patterns="to_k", lycoris=True, device="cpu"
    )
    kept = ["lora_unet_transformer_blocks_0_attn_to_q.hada_w1_a"]
    (_, kwargs), merge = calls
    assert sorted(kwargs["weights_sd"]) == kept and kwargs["unet"] is model
    assert (kwargs["multiplier"], kwargs["file"], kwargs["for_inference"]) == (0.6, None, True)
    assert merge == ("merge_to", None, model, kept, None, "cpu")
    assert report.formats == {"LyCORIS": 2} and report.filtered_out == 1


def test_merging_an_fp8_model_is_refused(tmp_path):
    from frame_pack.fp8 import apply_fp8

    model = tiny_model(torch.bfloat16)
    apply_fp8(model, scaled=True)
    with pytest.raises(RuntimeError, match="before fp8"):
        merge_lora_files(model, [write(tmp_path, "a.safetensors", framepack_lora(CONFIG))])
    with pytest.raises(RuntimeError, match="before fp8"):
        save_merged_model(model, str(tmp_path / "m.safetensors"))


def test_saved_merged_model_loads_as_dit_and_generates_the_same_output(tmp_path):
    model = tiny_model(torch.bfloat16)
    merge_lora_files(model, [write(tmp_path, "a.safetensors", framepack_lora(CONFIG, seed=8))])
    out_path = tmp_path / "merged.safetensors"
    save_merged_model(model, str(out_path))
    loaded = load_packed_model(str(out_path)).eval()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    kw = section_inputs(h=4, w=4, clean=False)
    with torch.no_grad():
        assert torch.equal(model(**kw), loaded(**kw))
