"""The LoRA network (networks.lora, networks.lora_framepack) on the tiny DiT: naming, math, training, files."""

import hashlib
import logging
import math

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from frame_pack.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked, PackedDiTConfig
from networks import lora_framepack
from networks.lora import LoRAInfModule, LoRAModule
from tests.factory.dit import tiny_dit_config, tiny_dit_state_dict
from tests.factory.lora import framepack_lora, framepack_modules


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny matrices cost less than thread hand-offs (far less on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(dtype=torch.float32, seed=0):
    config = tiny_dit_config()
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModelPacked(config)
    model.load_state_dict(tiny_dit_state_dict(seed, config, dtype=dtype), assign=True)
    return model.eval().requires_grad_(False)


def create(model, dim=4, alpha=1.0, **network_args):
    return lora_framepack.create_arch_network(1.0, dim, alpha, None, None, model, **network_args)


def names(network):
    return [m.lora_name for m in network.unet_loras]


# ---- targets and naming ---------------------------------------------------------------------------------------


def test_modules_and_saved_keys_are_those_of_the_spec_table(tmp_path):
    network = create(tiny_model(), dim=4)
    expected = framepack_modules(tiny_dit_config())
    assert set(names(network)) == set(expected)  # 34 = 2 x 12 + 2 x 5; no norm Linear
    assert not any("norm" in n for n in names(network))

    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), torch.bfloat16, {})
    with safe_open(path, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    want = {}
    for name, (_, (out_features, in_features)) in expected.items():
        want[f"{name}.lora_down.weight"] = (4, in_features)
        want[f"{name}.lora_up.weight"] = (out_features, 4)
        want[f"{name}.alpha"] = ()
    assert shapes == want
    assert dtypes == {"BF16"}
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in shapes


def test_full_size_network_has_440_modules_and_rank_times_4300800_parameters():
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModelPacked(PackedDiTConfig())
    network = create(model, dim=1)
    assert len(network.unet_loras) == 440
    assert sum(p.numel() for p in network.parameters()) == 4_300_800
    shapes = {m.lora_name: (m.lora_up.weight.shape[0], m.lora_down.weight.shape[1]) for m in network.unet_loras}
    assert shapes["lora_unet_transformer_blocks_19_ff_net_0_proj"] == (12288, 3072)
    assert shapes["lora_unet_transformer_blocks_0_ff_context_net_2"] == (3072, 12288)
    assert shapes["lora_unet_single_transformer_blocks_39_proj_out"] == (3072, 15360)


# musubi-tuner's model registers attention Linears as to_q, to_k, to_v, add_k_proj, add_v_proj, add_q_proj, to_out,
# to_add_out (diffusers' Attention); that order decides which random draws initialise which module.
REFERENCE_DOUBLE = [
    "attn_to_q",
    "attn_to_k",
    "attn_to_v",
    "attn_add_k_proj",
    "attn_add_v_proj",
    "attn_add_q_proj",
    "attn_to_out_0",
    "attn_to_add_out",
    "ff_net_0_proj",
    "ff_net_2",
    "ff_context_net_0_proj",
    "ff_context_net_2",
]
REFERENCE_SINGLE = ["attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp", "proj_out"]


def test_creation_order_and_seeded_initialisation_follow_the_reference():
    config = tiny_dit_config()
    order = [f"lora_unet_transformer_blocks_{i}_{c}" for i in range(config.num_layers) for c in REFERENCE_DOUBLE]
    order += [
        f"lora_unet_single_transformer_blocks_{i}_{c}"
        for i in range(config.num_single_layers)
        for c in REFERENCE_SINGLE
    ]
    model = tiny_model()
    torch.manual_seed(1234)
    network = create(model, dim=4)
    assert names(network) == order
    assert list(network.state_dict())[:3] == [
        "lora_unet_transformer_blocks_0_attn_to_q.alpha",
        "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight",
        "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight",
    ]

    # Per module: Linear(in, r) and Linear(r, out) each draw their default Kaiming-uniform init, then down is redrawn.
    shapes = {n: s for n, (_, s) in framepack_modules(config).items()}
    torch.manual_seed(1234)
    for module in network.unet_loras:
        out_features, in_features = shapes[module.lora_name]
        for shape in ((4, in_features), (out_features, 4), (4, in_features)):
            draw = torch.empty(shape)
            nn.init.kaiming_uniform_(draw, a=math.sqrt(5))
        assert torch.equal(module.lora_down.weight, draw)
        assert not module.lora_up.weight.any()


def test_exclude_and_include_patterns(caplog):
    model = tiny_model()
    base = set(names(create(model)))

    only_mlp = names(create(model, exclude_patterns="[r'.*attn.*']"))
    assert only_mlp and all("attn" not in n for n in only_mlp)
    # Patterns match at the start of the module path (re.match), not anywhere.
    assert set(names(create(model, exclude_patterns="['attn']"))) == base
    assert all("single" not in n for n in names(create(model, exclude_patterns="['single_']")))

    # include re-admits excluded modules (here the default norm exclusion) and restricts nothing else.
    with_norm1 = set(names(create(model, include_patterns=r"['.*norm1\.linear']")))
    assert with_norm1 - base == {f"lora_unet_transformer_blocks_{i}_norm1_linear" for i in range(2)}
    assert set(names(create(model, include_patterns=r"['transformer_blocks\.0\.attn\.to_q']"))) == base

    with pytest.raises(ValueError, match="exclude_patterns: '\\(' is not a valid regex"):  # an error, not ignored
        create(model, exclude_patterns="['(']")
    with pytest.raises(ValueError, match="list of regex"):
        create(model, exclude_patterns="'.*attn.*'")


def test_network_args_strings_are_parsed_like_the_trainer_passes_them(caplog):
    with caplog.at_level(logging.INFO):
        network = create(tiny_model(), rank_dropout="0.25", module_dropout="0.1", loraplus_lr_ratio="4", verbose="True")
    module = network.unet_loras[0]
    assert (module.rank_dropout, module.module_dropout, network.loraplus_lr_ratio) == (0.25, 0.1, 4.0)
    assert "exclude: transformer_blocks.0.norm1.linear" in caplog.text
    defaults = lora_framepack.create_arch_network(1.0, None, None, None, None, tiny_model())
    assert (defaults.unet_loras[0].lora_dim, defaults.unet_loras[0].scale) == (4, 0.25)


# ---- module math ----------------------------------------------------------------------------------------------------


def adapted_linear(**kwargs):
    torch.manual_seed(0)
    linear = nn.Linear(8, 6)
    module = LoRAModule("lora_test", linear, lora_dim=4, **kwargs)
    with torch.no_grad():
        module.lora_up.weight.normal_()
    module.apply_to()
    return linear, module


def test_forward_adds_up_down_times_multiplier_and_alpha_over_rank():
    linear, module = adapted_linear(multiplier=0.5, alpha=2.0)
    x = torch.randn(2, 3, 8)
    down, up = module.lora_down.weight, module.lora_up.weight
    expected = x @ linear.weight.T + linear.bias + 0.5 * (x @ down.T @ up.T) * (2.0 / 4)
    torch.testing.assert_close(linear(x), expected)
    assert module.alpha.dtype == torch.float32 and module.alpha.item() == 2.0

    for alpha, scale in ((None, 1.0), (0, 1.0), (torch.tensor(8.0, dtype=torch.bfloat16), 2.0), (1, 0.25)):
        assert LoRAModule("m", nn.Linear(8, 6), lora_dim=4, alpha=alpha).scale == scale
    assert LoRAModule("m", nn.Linear(8, 6), lora_dim=4, alpha=1).alpha.dtype == torch.int64


def test_dropouts_act_in_training_mode_only():
    x = torch.randn(2, 3, 8)
    reference_linear, reference = adapted_linear(alpha=4.0)
    plain = reference_linear(x)
    org = F.linear(x, reference_linear.weight, reference_linear.bias)

    for kwargs in ({"dropout": 0.5}, {"rank_dropout": 0.5}, {"module_dropout": 1.0}):
        linear, module = adapted_linear(alpha=4.0, **kwargs)
        module.eval()
        torch.testing.assert_close(linear(x), plain)

    linear, module = adapted_linear(alpha=4.0, module_dropout=1.0)
    module.train()
    torch.testing.assert_close(linear(x), org)

    down, up = reference.lora_down.weight, reference.lora_up.weight
    linear, module = adapted_linear(alpha=4.0, dropout=0.5)
    module.train()
    torch.manual_seed(5)
    y = linear(x)
    torch.manual_seed(5)
    torch.testing.assert_close(y, org + F.dropout(x @ down.T, p=0.5) @ up.T)

    linear, module = adapted_linear(alpha=4.0, rank_dropout=0.5)
    module.train()
    torch.manual_seed(6)
    y = linear(x)
    torch.manual_seed(6)
    keep = (torch.rand(2, 4) > 0.5).unsqueeze(1)  # one mask per sample over the rank, shared along the sequence
    torch.testing.assert_close(y, org + ((x @ down.T) * keep) @ up.T * (1.0 / (1 - 0.5)))


def test_gradients_reach_only_the_lora_parameters():
    model = tiny_model()
    network = create(model)
    network.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    network.prepare_grad_etc(model)
    block = model.single_transformer_blocks[0]
    x = torch.randn(1, 5, 128)
    out = block.proj_mlp(x).sum() + block.attn.to_q(x).sum()
    out.backward()
    assert network.lora_unet_single_transformer_blocks_0_proj_mlp.lora_up.weight.grad.abs().sum() > 0
    assert block.proj_mlp.weight.grad is None


def test_inference_module_can_be_disabled():
    linear = nn.Linear(8, 6)
    module = LoRAInfModule("m", linear, lora_dim=4, alpha=4.0)
    with torch.no_grad():
        module.lora_up.weight.normal_()
    module.apply_to()
    x = torch.randn(3, 8)
    assert not torch.allclose(linear(x), F.linear(x, linear.weight, linear.bias))
    module.enabled = False
    torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias))


# ---- optimizer groups, max-norm, files ---------------------------------------------------------------------------


def test_optimizer_groups_with_and_without_loraplus():
    network = create(tiny_model())
    params, descriptions = network.prepare_optimizer_params(unet_lr=1e-4)
    assert descriptions == ["unet"] and params[0]["lr"] == 1e-4
    assert len(params[0]["params"]) == 2 * len(network.unet_loras)

    network.set_loraplus_lr_ratio(16.0)
    params, descriptions = network.prepare_optimizer_params(unet_lr=1e-4)
    assert descriptions == ["unet", "unet plus"]
    assert params[1]["lr"] == pytest.approx(1.6e-3)
    ups = {id(m.lora_up.weight) for m in network.unet_loras}
    assert {id(p) for p in params[1]["params"]} == ups
    assert not ups & {id(p) for p in params[0]["params"]}

    assert network.prepare_optimizer_params(unet_lr=0) == ([], [])


def test_max_norm_scales_only_modules_above_the_limit():
    network = create(tiny_model(), dim=4, alpha=4.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for i, module in enumerate(network.unet_loras):
            module.lora_up.weight.normal_(std=1.0 if i % 2 else 1e-4)
    delta_norm = lambda m: (m.lora_up.weight @ m.lora_down.weight * m.scale).norm().item()
    before = [delta_norm(m) for m in network.unet_loras]
    limit = 1.0
    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(limit, "cpu")
    after = [delta_norm(m) for m in network.unet_loras]

    assert scaled == sum(n > limit for n in before) == len(before) // 2
    for b, a in zip(before, after):
        assert a == pytest.approx(min(b, limit), rel=1e-4)
    assert mean_norm == pytest.approx(sum(after) / len(after), rel=1e-4)
    assert max_norm == pytest.approx(limit, rel=1e-4)


def test_save_load_round_trip_with_metadata_and_hashes(tmp_path):
    model = tiny_model()
    torch.manual_seed(0)
    network = create(model, dim=4, alpha=8.0)
    with torch.no_grad():
        for module in network.unet_loras:
            module.lora_up.weight.normal_()
    path = tmp_path / "lora.safetensors"
    metadata = {"ss_network_dim": "4", "ss_network_alpha": "8.0", "modelspec.title": "t"}
    network.save_weights(str(path), torch.bfloat16, metadata)

    with safe_open(path, "pt") as f:
        stored_meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: stored_meta[k] for k in metadata} == metadata
    # sshs hashes: the file serialised with only ss_* metadata; SHA-256 after the header / 64 KiB at 1 MiB.
    data = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    assert stored_meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert stored_meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]

    # Loading into a network created with another alpha: weights come back, and so does the trained scale.
    other = create(model, dim=4, alpha=1.0)
    info = other.load_weights(str(path))
    assert not info.missing_keys and not info.unexpected_keys
    for a, b in zip(network.unet_loras, other.unet_loras):
        assert torch.equal(a.lora_up.weight.to(torch.bfloat16).float(), b.lora_up.weight)
        assert b.scale == 2.0

    pt_path = tmp_path / "lora.pt"
    network.save_weights(str(pt_path), None, None)
    assert set(torch.load(pt_path, weights_only=True)) == set(tensors)


def test_network_from_weights_takes_ranks_and_alphas_from_the_file(caplog):
    config = tiny_dit_config()
    sd = framepack_lora(config, rank=2, alpha=3.0, dtype=torch.float32)
    sd = {k: v for k, v in sd.items() if "transformer_blocks_0_" in k}
    sd["lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"] = torch.zeros(8, 128)
    sd["lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight"] = torch.zeros(128, 8)
    del sd["lora_unet_single_transformer_blocks_0_proj_out.alpha"]

    with caplog.at_level(logging.WARNING):
        network = lora_framepack.create_arch_network_from_weights(0.5, sd, unet=tiny_model(), for_inference=True)
    modules = {m.lora_name: m for m in network.unet_loras}
    assert set(modules) == {k.split(".")[0] for k in sd}
    assert all(isinstance(m, LoRAInfModule) and m.multiplier == 0.5 for m in modules.values())
    assert modules["lora_unet_transformer_blocks_0_attn_to_q"].lora_dim == 8
    assert modules["lora_unet_transformer_blocks_0_attn_to_k"].scale == 1.5
    assert modules["lora_unet_single_transformer_blocks_0_proj_out"].scale == 1.0
    assert "no alpha" in caplog.text
