"""--compile and the step caches in fpack_train_network.py: compiled training steps, cached sampling."""

import logging
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from frame_pack.magcache import DEFAULT_MAG_RATIOS, magcache_schedule, resample_ratios
from tests import test_train as TT
from tests.test_train import LWS, sample_model_files, train

single = TT.single  # the same module-scoped cached section (models: the conftest fixture)


def test_compiled_training_matches_eager_and_samples_use_magcache(models, single, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    image = tmp_path / "start.png"
    Image.fromarray(np.full((32, 48, 3), 90, np.uint8)).save(image)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a box --w 48 --h 32 --f {4 * LWS + 1} --d 7 --s 6 --i {image}\n")
    sampling = ["--sample_prompts", prompts, "--sample_at_first", "--latent_window_size", LWS,
                "--magcache_mag_ratios", "0", *sample_model_files(models)]  # fmt: skip
    # aot_eager traces forward and backward graphs like inductor does, without generating C++ (compile time)
    compiled = train(models, single, tmp_path / "compiled", "--compile", "--compile_backend", "aot_eager", *sampling,
                     steps=1)  # fmt: skip
    computes = sum(magcache_schedule(resample_ratios(DEFAULT_MAG_RATIOS, 6)))
    assert f"MagCache: the blocks ran on {computes} of 6 steps" in caplog.text
    assert "torch.compile: 4 blocks" in caplog.text
    assert len(os.listdir(compiled / "sample")) == 1
    eager = train(models, single, tmp_path / "eager", steps=1)
    a, b = load_file(compiled / "lora.safetensors"), load_file(eager / "lora.safetensors")
    assert a.keys() == b.keys()
    # Adam's first step moves each weight by ±lr·sign(grad): entries whose gradient is ~0 may flip sign between
    # the compiled and the eager run (bf16 rounding), the rest agree
    agree = torch.cat([torch.isclose(a[k].float(), b[k].float(), rtol=0.05, atol=2e-3).flatten() for k in a])
    assert agree.float().mean() > 0.9
