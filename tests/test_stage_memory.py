"""Generation memory between stages: each stage's models leave the device before the next stage's arrive (checked
by the model cache's placement bookkeeping), and `--vae_dtype` gives the VAE numerics of the dtype asked for."""

import logging

import pytest
import torch

from hunyuan_model.vae import load_vae
from pipelines import generate as G
from pipelines.models import ModelCache, vae_dtype
from pipelines.settings import ModelSettings
from tests import test_generate

ENCODERS = ("text encoders", "image encoder")
images, run = test_generate.images, test_generate.run  # the generation start images and runner


@pytest.fixture
def stage_placements(monkeypatch):
    """(stage, placement of every model) each time a stage asks the cache for its model."""
    seen = []
    for stage, method in (("text", "text_encoders"), ("image", "image_encoder"), ("VAE", "vae"), ("DiT", "dit")):
        original = getattr(ModelCache, method)

        def spy(self, *args, original=original, stage=stage, **kwargs):
            seen.append((stage, dict(self.placement)))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(ModelCache, method, spy)
    return seen


def assert_one_stage_at_a_time(seen, generations):
    stages = [stage for stage, _ in seen]
    assert stages == ["text", "image", "VAE", "DiT", "VAE"] * generations
    for stage, placement in seen:
        on_device = {name for name, where in placement.items() if where == "device"}
        if stage == "DiT":  # encoders and the VAE have left before the DiT arrives
            assert on_device == set(), placement
        if stage == "VAE":  # the encoders before the VAE encodes, the DiT before it decodes
            assert on_device <= {"VAE"}, placement


def test_one_generation_holds_one_stage_on_the_device(models, images, tmp_path, stage_placements, caplog):
    with caplog.at_level(logging.INFO, logger="pipelines.models"):
        run(models, tmp_path, "--image_path", images[0], "--prompt", "p", "--video_sections", "1")
    assert_one_stage_at_a_time(stage_placements, 1)
    # one-shot generation drops each model after its stage
    assert stage_placements[-1][1]["DiT"] == "not loaded" and stage_placements[-1][1]["text encoders"] == "not loaded"
    assert "models: text encoders not loaded, image encoder not loaded, VAE offloaded to cpu, DiT on cpu" in caplog.text
    assert "models: text encoders not loaded, image encoder not loaded, VAE on cpu, DiT not loaded" in caplog.text


def test_batch_mode_offloads_to_the_cpu_between_stages(models, images, tmp_path, stage_placements, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"first --i {images[0]} --vs 1\nsecond --i {images[1]} --vs 1\n")
    with caplog.at_level(logging.INFO, logger="pipelines.models"):
        run(models, tmp_path / "out", "--from_file", str(prompts))
    assert_one_stage_at_a_time(stage_placements, 2)
    _, decode = stage_placements[-1]
    assert decode["DiT"] == "cpu" and all(decode[name] == "cpu" for name in ENCODERS)  # kept, off the device
    offloaded = "text encoders offloaded to cpu, image encoder offloaded to cpu, VAE on cpu, DiT offloaded to cpu"
    assert f"models: {offloaded}" in caplog.text


def test_vae_dtype_defaults_follow_the_device():
    assert vae_dtype(None, torch.device("cuda")) == torch.float16
    assert vae_dtype(None, torch.device("cpu")) == torch.float32
    assert vae_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_vae_dtype_float16_decodes_with_float16_numerics_on_the_cpu(models):
    latent = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    decoded = {}
    for name in (None, "float16"):
        cache = ModelCache(ModelSettings(vae=str(models.vae), vae_dtype=name), torch.device("cpu"), keep=True)
        vae = cache.vae()
        with torch.no_grad():
            decoded[name] = G.decode_video(vae, latent, 1, bulk=True, one_frame=False)
    assert decoded[None].dtype == torch.float32 and decoded["float16"].dtype == torch.float16

    # fp16 reference: the float32 model cast to float16 after loading, decoding the same latent
    reference = load_vae(str(models.vae), dtype=torch.float32).half()
    with torch.no_grad():
        expected = reference.decode(latent)[0]
    assert torch.equal(decoded["float16"], expected)
    assert not torch.equal(decoded["float16"].float(), decoded[None])
    torch.testing.assert_close(decoded["float16"].float(), decoded[None], atol=3e-2, rtol=0)


def test_generation_accepts_vae_dtype_and_refuses_other_names(models, images, tmp_path, capsys):
    run(models, tmp_path, "--image_path", images[0], "--prompt", "p", "--video_sections", "1", "--vae_dtype",
        "bfloat16", "--output_type", "latent")  # fmt: skip
    with pytest.raises(SystemExit):
        run(models, tmp_path, "--image_path", images[0], "--prompt", "p", "--vae_dtype", "half")
    assert "--vae_dtype" in capsys.readouterr().err
