"""LoRA switching on a loaded tiny DiT (networks.lora_switch) against fresh models merged the ordinary way."""

import pytest
import torch

from frame_pack.fp8 import apply_fp8
from networks import lora_merge
from networks.lora_switch import LoraSpec, LoraSwitcher, lora_set
from tests.factory.dit import tiny_dit_config
from tests.factory.lora import framepack_lora, framepack_modules, random_lora
from tests.test_lora import one_thread  # noqa: F401  (autouse: one thread for the tiny matrices)
from tests.test_lora import tiny_model as tiny_model_of
from utils.safetensors_utils import save_safetensors


def tiny_model():
    return tiny_model_of(torch.bfloat16)  # as the checkpoints


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A: every target module. B: only double block 0 (so its base copies are a strict subset)."""
    folder = tmp_path_factory.mktemp("loras")
    config = tiny_dit_config()
    a = folder / "a.safetensors"
    save_safetensors(framepack_lora(config, rank=4, alpha=4.0, seed=1), a)
    block0 = {n: s for n, (p, s) in framepack_modules(config).items() if p.startswith("transformer_blocks.0.")}
    b = folder / "b.safetensors"
    save_safetensors(random_lora(block0, rank=2, alpha=1.0, seed=2), b)
    return str(a), str(b), sorted(block0)


def fresh(loras, fp8=None):
    """What one run with these LoRAs loads: merge into the checkpoint weights, then quantize."""
    model = tiny_model()
    if loras:
        lora_merge.merge_lora_files(
            model, [s.path for s in loras], [s.multiplier for s in loras], [s.include for s in loras],
            [s.exclude for s in loras],
        )  # fmt: skip
    if fp8:
        apply_fp8(model, scaled=fp8 == "scaled")
    return model.state_dict()


def assert_same_state(model, expected):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key].view(torch.uint8), value.view(torch.uint8)), key


def test_switching_equals_fresh_merges_bit_for_bit_and_restores_the_base(loras):
    a, b, _ = loras
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    switcher = LoraSwitcher(model)
    sequence = [
        lora_set([a], 1.0),
        (),
        lora_set([a, b], [0.8, 1.0]),
        lora_set([b], 0.5),
        lora_set([a], 1.0),
    ]
    for loras_now in sequence:
        switcher.apply(loras_now)
        assert_same_state(model, fresh(loras_now))
    switcher.apply(())
    assert_same_state(model, base)


def test_the_same_set_again_does_no_work(loras, monkeypatch):
    a, _, _ = loras
    switcher = LoraSwitcher(tiny_model())
    assert switcher.apply(lora_set([a], 0.7))
    calls = []
    monkeypatch.setattr(lora_merge, "merge_lora_files", lambda *a, **k: calls.append(a))
    assert not switcher.apply(lora_set([a], [0.7]))  # equal set, spelled differently
    assert calls == [] and switcher.switches == 1


def test_base_copies_are_only_the_touched_modules(loras):
    _, b, block0 = loras
    model = tiny_model()
    switcher = LoraSwitcher(model)
    switcher.apply(lora_set([b]))
    assert sorted(switcher.base) == block0
    expected = sum(switcher.linears[n].weight.nbytes for n in block0)
    assert switcher.base_bytes == expected
    total = sum(p.nbytes for p in model.parameters())
    assert switcher.base_bytes < total / 4
    assert all(b.weight.device.type == "cpu" for b in switcher.base.values())


@pytest.mark.parametrize("mode", ["scaled", "plain"])
def test_fp8_switching_with_bases_kept_before_quantization_is_exact(loras, mode):
    a, b, _ = loras
    sets = [lora_set([a], 1.0), lora_set([b], 0.6), (), lora_set([a, b], [1.0, 0.3])]
    model = tiny_model()
    switcher = LoraSwitcher(model)
    switcher.keep_base(switcher.touched_modules({s for lora_set_ in sets for s in lora_set_}))
    switcher.apply(sets[0])  # the command-line LoRAs, merged before quantization as at load
    apply_fp8(model, scaled=mode == "scaled")
    assert_same_state(model, fresh(sets[0], mode))
    for loras_now in sets[1:]:
        switcher.apply(loras_now)
        assert_same_state(model, fresh(loras_now, mode))


def test_fp8_switching_with_a_base_kept_after_quantization_is_close_and_restores_exactly(loras):
    a, _, _ = loras
    model = tiny_model()
    apply_fp8(model, scaled=True)
    quantized_base = {k: v.clone() for k, v in model.state_dict().items()}
    switcher = LoraSwitcher(model)
    switcher.apply(lora_set([a]))
    expected = fresh(lora_set([a]), "scaled")
    state = model.state_dict()
    for key in expected:
        if key.endswith("weight") and state[key].dtype == torch.float8_e4m3fn:
            got = state[key].float() * state[key[: -len("weight")] + "scale_weight"].float()
            want = expected[key].float() * expected[key[: -len("weight")] + "scale_weight"].float()
            assert (got - want).norm() <= 0.06 * want.norm(), key  # the base's e4m3 rounding, then the merge's
    switcher.apply(())
    assert_same_state(model, quantized_base)


def test_a_file_that_fits_nothing_is_refused_before_weights_change(tmp_path, loras):
    a, _, _ = loras
    bad = tmp_path / "bad.safetensors"
    save_safetensors(random_lora({"lora_unet_nothing_here": (8, 8)}, seed=0), bad)
    model = tiny_model()
    switcher = LoraSwitcher(model)
    switcher.apply(lora_set([a]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lora_merge.LoraFormatError):
        switcher.apply((LoraSpec(str(bad)),))
    assert_same_state(model, before)
    assert switcher.active == lora_set([a])


def test_lora_set_from_flags():
    assert lora_set(["x.safetensors", "y.safetensors"], 0.5, ["blocks"]) == (
        LoraSpec(lora_set(["x.safetensors"])[0].path, 0.5, "blocks", None),
        LoraSpec(lora_set(["y.safetensors"])[0].path, 0.5, None, None),
    )
    with pytest.raises(ValueError, match="3 multipliers given for 2 LoRA files"):
        lora_set(["x", "y"], [1, 2, 3])
