"""bench/gpu_check.py --dry_run: the GPU acceptance script's code at tiny sizes on the CPU."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_prints_the_table_and_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry_run", "--repeats", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| check | result |" in result.stdout and "FLOPs/forward = L * (24 * D^2 * N + 4 * N^2 * D)" in result.stdout
    data = json.loads(out.read_text())
    for key in ("attn_sdpa", "steps_uncached", "teacache", "magcache", "swap_0", "compile", "fp8_scaled",
                "vae_untiled", "vae_tiled"):  # fmt: skip
        assert key in data, key
    tokens = data["tokens"]
    # tiny DiT: 4 blocks of width 128; N = noisy + clean + text tokens
    n = tokens["noisy"] + tokens["clean"] + tokens["text"]
    assert data["flops_per_forward"] == 4 * (24 * 128**2 * n + 4 * n**2 * 128)
    assert tokens["noisy"] == 9 * 4 * 4  # 9 latent frames of 8x8 latents, 2x2 patches
    steps_blocks = data["steps_uncached"]["block_evals"]
    assert steps_blocks == 4 * 4 and data["magcache"]["block_evals"] < steps_blocks
    assert data["vae_tiled"]["frames"] == data["vae_untiled"]["frames"] == 9
    assert not os.path.exists(str(out) + ".tmp")
