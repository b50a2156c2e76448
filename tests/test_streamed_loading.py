"""Streaming the DiT: fp8 quantization and LoRA merges while the checkpoint is read give the same bits as the
whole-model path; the streaming reader and writer of safetensors files."""

import os

import pytest
import torch
from safetensors.torch import load_file

from frame_pack import fp8 as fp8_module
from frame_pack.dit_loader import dit_skeleton, load_packed_model, save_merged_dit
from frame_pack.fp8 import FP8_DTYPE, Fp8Settings, apply_fp8, quantize_per_tensor, quantize_weight
from networks.lora_merge import merge_lora_files, plan_lora_merge
from tests.factory.dit import tiny_dit_config
from tests.factory.lora import framepack_lora
from tests.test_dit import section_inputs
from tests.test_lora import one_thread  # noqa: F401 (autouse fixture)
from utils.safetensors_utils import (
    read_header,
    release_mapped_pages,
    save_safetensors,
    stream_tensors,
    write_safetensors_streaming,
)

CONFIG = tiny_dit_config()


def bits(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors compared by their bytes (torch.equal has no fp8 kernel on every build)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(bits(sa[key]), bits(sb[key])), key


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    paths = []
    for seed, include_norm in ((1, True), (2, False)):
        path = root / f"lora{seed}.safetensors"
        save_safetensors(framepack_lora(CONFIG, include_norm=include_norm, rank=4, alpha=2.0, seed=seed), path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("scaled", [True, False])
def test_streamed_fp8_equals_quantizing_the_fully_loaded_model(tiny_dit_files, layout, scaled):
    loaded = load_packed_model(tiny_dit_files[layout])
    count = apply_fp8(loaded, scaled=scaled)
    streamed = load_packed_model(tiny_dit_files[layout], fp8=Fp8Settings(scaled=scaled))
    assert_same_state(loaded, streamed)
    state = streamed.state_dict()
    assert sum(t.dtype == FP8_DTYPE for t in state.values()) == count
    assert sum(k.endswith(".scale_weight") for k in state) == (count if scaled else 0)
    assert state["transformer_blocks.0.norm1.linear.weight"].dtype == torch.bfloat16  # modulation stays bf16
    kw = section_inputs(h=4, w=4, clean=False)
    with torch.no_grad():
        assert torch.equal(loaded(**kw), streamed(**kw))


def test_streamed_fp8_after_a_dtype_cast_equals_the_cast_model(tiny_dit_files):
    loaded = load_packed_model(tiny_dit_files["single"], dtype=torch.float32)
    apply_fp8(loaded, scaled=True)
    streamed = load_packed_model(tiny_dit_files["single"], dtype=torch.float32, fp8=Fp8Settings())
    assert_same_state(loaded, streamed)
    assert streamed.state_dict()["transformer_blocks.0.attn.to_q.scale_weight"].dtype == torch.float32


def test_lora_then_quantize_while_streaming_equals_merge_then_quantize(tiny_dit_files, loras):
    multipliers = [0.7, -0.4]
    merged = load_packed_model(tiny_dit_files["sharded"])
    merge_lora_files(merged, loras, multipliers)
    apply_fp8(merged, scaled=True)

    plan = plan_lora_merge(dit_skeleton(tiny_dit_files["sharded"]), loras, multipliers)
    assert len(plan.deltas) > 0 and [r.multiplier for r in plan.reports] == multipliers
    streamed = load_packed_model(tiny_dit_files["sharded"], weight_transform=plan, fp8=Fp8Settings())
    assert plan.deltas == {}  # every delta was used, and released
    assert_same_state(merged, streamed)

    # the LoRA did change the weights that were quantized
    plain = load_packed_model(tiny_dit_files["sharded"], fp8=Fp8Settings())
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(bits(plain.state_dict()[key]), bits(streamed.state_dict()[key]))


def test_streamed_bf16_merge_equals_the_whole_model_merge_and_its_formula(tiny_dit_files, loras):
    merged = load_packed_model(tiny_dit_files["single"])
    merge_lora_files(merged, loras[:1], 0.5)
    plan = plan_lora_merge(dit_skeleton(tiny_dit_files["single"]), loras[:1], 0.5)
    streamed = load_packed_model(tiny_dit_files["single"], weight_transform=plan)
    assert_same_state(merged, streamed)

    # independent statement of the merge: W + m * (up @ down) * alpha / rank in float32, rounded to bf16
    base = load_packed_model(tiny_dit_files["single"]).state_dict()
    lora = load_file(loras[0])
    name = "lora_unet_single_transformer_blocks_1_proj_out"
    down, up = lora[f"{name}.lora_down.weight"].float(), lora[f"{name}.lora_up.weight"].float()
    key = "single_transformer_blocks.1.proj_out.weight"
    expected = (base[key].float() + 0.5 * (up @ down) * (2.0 / 4)).bfloat16()
    assert torch.equal(streamed.state_dict()[key], expected)


def test_lora_of_another_model_size_is_refused_before_the_dit_is_read(tiny_dit_files, tmp_path):
    wide = framepack_lora(tiny_dit_config(num_attention_heads=2), rank=4)
    path = tmp_path / "wide.safetensors"
    save_safetensors(wide, path)
    with pytest.raises(ValueError, match="do not fit this DiT"):
        plan_lora_merge(dit_skeleton(tiny_dit_files["single"]), [str(path)])


def test_save_merged_dit_streams_the_merged_weights_into_a_loadable_file(tiny_dit_files, loras, tmp_path):
    out = tmp_path / "merged" / "dit.safetensors"
    plan = plan_lora_merge(dit_skeleton(tiny_dit_files["sharded"]), loras, [0.3, 0.9])
    save_merged_dit(tiny_dit_files["sharded"], plan, str(out))
    assert os.listdir(out.parent) == ["dit.safetensors"]  # no temporary left behind
    assert read_header(out)[1] == {"format": "pt"}
    merged = load_packed_model(tiny_dit_files["sharded"])
    merge_lora_files(merged, loras, [0.3, 0.9])
    assert_same_state(merged, load_packed_model(str(out)))


def test_stream_tensors_yields_every_tensor_as_stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g).bfloat16(),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2, generator=g),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
    }
    paths = [tmp_path / "x.safetensors", tmp_path / "y.safetensors"]
    save_safetensors({k: tensors[k] for k in ("a", "b")}, paths[0])
    save_safetensors({k: tensors[k] for k in ("c", "empty", "scalar")}, paths[1])
    seen = {}
    for key, tensor in stream_tensors([str(p) for p in paths]):
        assert tensor.dtype == tensors[key].dtype and tensor.shape == tensors[key].shape
        seen[key] = tensor.clone()
    assert seen.keys() == tensors.keys()
    assert all(torch.equal(seen[k], tensors[k]) for k in tensors)


def test_streaming_writer_round_trips_and_refuses_a_tensor_out_of_layout(tmp_path):
    tensors = {"w": torch.randn(4, 3).bfloat16(), "q": torch.randn(8).to(FP8_DTYPE), "s": torch.tensor([1.5])}
    layout = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    path = tmp_path / "out.safetensors"
    write_safetensors_streaming(path, layout, iter(tensors.items()), metadata={"z": "1", "a": "2"})
    back = load_file(path)
    assert all(torch.equal(bits(back[k]), bits(t)) for k, t in tensors.items())
    assert read_header(path)[1] == {"a": "2", "z": "1"}

    bad = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match="layout expects"):
        write_safetensors_streaming(bad, layout, iter([("w", tensors["w"]), ("s", tensors["s"])]))
    with pytest.raises(ValueError, match="fewer tensors"):
        write_safetensors_streaming(bad, layout, iter([("w", tensors["w"])]))
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_chunked_quantizer_does_not_depend_on_the_chunk_size(monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(37, 29, generator=g) * 0.07).bfloat16()
    w[5, 7] = 0.9  # the max sits in a middle chunk
    whole_q, whole_scale = quantize_per_tensor(w)
    plain_whole, _ = quantize_weight(w, scaled=False)
    monkeypatch.setattr(fp8_module, "QUANTIZE_CHUNK", 100)
    chunked_q, chunked_scale = quantize_per_tensor(w)
    plain_chunked, none = quantize_weight(w, scaled=False)
    assert torch.equal(whole_scale, chunked_scale) and none is None
    assert torch.equal(bits(whole_q), bits(chunked_q)) and torch.equal(bits(plain_whole), bits(plain_chunked))
    # against the formula written out: clamp(W / (max|W| / 448), ±448) cast to e4m3
    scale = (w.abs().max() / 448).reshape(1)
    assert torch.equal(whole_scale, scale)
    assert torch.equal(bits(whole_q), bits((w / scale).clamp(-448, 448).to(FP8_DTYPE)))


def test_merging_and_quantizing_a_few_rows_at_a_time_gives_the_bits_of_whole_tensors(
    tiny_dit_files, loras, monkeypatch
):
    multipliers = [0.7, -0.4]
    whole = load_packed_model(tiny_dit_files["single"])
    merge_lora_files(whole, loras, multipliers)
    apply_fp8(whole, scaled=True)
    # blocks of one or two rows: each weight is read, merged and quantized in many pieces, its file pages handed
    # back after the max pass and read again for the cast pass
    monkeypatch.setattr(fp8_module, "QUANTIZE_CHUNK", 64)
    assert fp8_module.block_rows((48, 32)) == 2 and fp8_module.block_rows((48, 96)) == 1
    plan = plan_lora_merge(dit_skeleton(tiny_dit_files["single"]), loras, multipliers)
    streamed = load_packed_model(tiny_dit_files["single"], weight_transform=plan, fp8=Fp8Settings())
    assert_same_state(whole, streamed)


def test_released_pages_of_a_streamed_tensor_read_back_the_same_and_other_tensors_are_untouched(tmp_path):
    tensors = {"a": torch.arange(5000, dtype=torch.float32), "b": torch.full((3000,), 7.0)}
    path = tmp_path / "t.safetensors"
    save_safetensors(tensors, path)
    for key, tensor in stream_tensors(str(path)):
        before = tensor.clone()
        release_mapped_pages(tensor[: tensor.numel() // 2])
        assert torch.equal(tensor, before) and torch.equal(tensor, tensors[key])
    kept = torch.arange(5000, dtype=torch.float32)
    release_mapped_pages(kept)  # not a view of a streamed file: nothing happens
    assert torch.equal(kept, tensors["a"])
