"""Host memory of loading the DiT: streamed fp8 quantization / LoRA merge / merged-model save vs the same work done
after a full bf16 load (what an implementation that quantizes a loaded model gets), measured in the same run.

Every variant runs in a fresh subprocess and touches every byte of the resulting weights (as a forward would), then
reports how far its resident set peaked above where it stood before loading (VmHWM after a reset, so a transient
peak of the imports does not hide part of the load). Each variant also runs on a tiny DiT; the figure printed is

    (peak growth with the mid-size DiT - peak growth with the tiny DiT) / size of the mid-size bf16 file

so the interpreter, torch and the code itself cancel out. "floor" is what the resulting weights themselves occupy
(fp8 targets 1 byte, everything else 2 bytes; plus the LoRA file for LoRA runs): no loader can go below it.
The synthetic DiT has FramePack's block counts (20 double, 40 single) and block proportions at width 1536
(factory initialisation; the values do not matter for memory). Its 1,714 tensors (1,274 weights and the fp8
scales) and their modules cost about 10 MiB of bookkeeping beyond their bytes whatever the width (the full-size DiT
has the same count), which is 0.006 of a width-768 file but 0.0016 of this one and 0.0004 of the real 24 GB one;
hence the default width.

    python bench/bench_memory.py                 # ~10 min on 2 CPU cores, 6.4 GB file, ~10 GB peak
    python bench/bench_memory.py --heads 6       # width 768 (1.6 GB file, ~3 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from common import child_or_main, peak_rss_mib, reset_peak_rss, run_variants  # noqa: E402

LORA_RANK = 8
LORA_MULTIPLIER = 0.8
# (name, streamed implementation, the same result computed after a full bf16 load, target for the streamed ratio)
VARIANTS = [
    ("bf16", "bf16", None, 1.1),
    ("fp8_scaled", "fp8_stream", "fp8_after_load", 0.65),
    ("fp8_scaled + LoRA", "fp8_lora_stream", "fp8_lora_after_load", 0.65),
    ("save_merged_model", "save_stream", "save_after_load", 1.1),
]


def touch(model) -> int:
    """Read every byte of every weight, so lazily mapped pages become resident as a forward would make them."""
    import torch

    total = 0
    for tensor in model.state_dict().values():
        # in pieces: the sum of a uint8 tensor accumulates in an int64 copy 8 times the piece's size
        for piece in tensor.detach().reshape(-1).view(torch.uint8).split(1 << 16):
            total += int(piece.sum())
    return total


def run_one(cfg: dict) -> dict:
    import torch

    from frame_pack.dit_loader import dit_skeleton, load_packed_model, save_merged_dit
    from frame_pack.fp8 import Fp8Settings, apply_fp8
    from networks.lora_merge import merge_lora_files, plan_lora_merge, save_merged_model

    torch.set_num_threads(1)
    dit, lora, out, mode = cfg["dit"], [cfg["lora"]], cfg["out"], cfg["mode"]
    before = reset_peak_rss()
    if mode == "bf16":
        touch(load_packed_model(dit))
    elif mode == "fp8_stream":
        touch(load_packed_model(dit, fp8=Fp8Settings()))
    elif mode == "fp8_after_load":
        model = load_packed_model(dit)
        apply_fp8(model)
        touch(model)
    elif mode == "fp8_lora_stream":
        plan = plan_lora_merge(dit_skeleton(dit), lora, LORA_MULTIPLIER)
        touch(load_packed_model(dit, weight_transform=plan, fp8=Fp8Settings()))
    elif mode == "fp8_lora_after_load":
        model = load_packed_model(dit)
        merge_lora_files(model, lora, LORA_MULTIPLIER)
        apply_fp8(model)
        touch(model)
    elif mode == "save_stream":
        save_merged_dit(dit, plan_lora_merge(dit_skeleton(dit), lora, LORA_MULTIPLIER), out)
    elif mode == "save_after_load":
        model = load_packed_model(dit)
        merge_lora_files(model, lora, LORA_MULTIPLIER)
        save_merged_model(model, out)
    if os.path.exists(out):
        os.remove(out)
    return {"peak_mib": peak_rss_mib() - before}


def write_models(folder: str, heads: int) -> dict:
    """Mid-size and tiny DiT files with a rank-8 LoRA each; returns their paths, sizes and weight floors."""
    import torch

    from frame_pack.fp8 import is_fp8_target
    from tests.factory.dit import tiny_dit_config, write_dit_streamed
    from tests.factory.lora import framepack_lora
    from utils.safetensors_utils import read_header, save_safetensors

    models = {}
    for size, config in (
        ("mid", tiny_dit_config(num_attention_heads=heads, num_layers=20, num_single_layers=40)),
        ("tiny", tiny_dit_config()),
    ):
        dit = write_dit_streamed(os.path.join(folder, f"{size}_dit.safetensors"), config)
        lora = os.path.join(folder, f"{size}_lora.safetensors")
        save_safetensors(framepack_lora(config, rank=LORA_RANK), lora)
        infos, _ = read_header(dit)
        elements = {k: torch.Size(v.shape).numel() for k, v in infos.items()}
        fp8_bytes = sum(n * (1 if is_fp8_target(k) else 2) for k, n in elements.items())
        models[size] = {
            "dit": dit,
            "lora": lora,
            "file": os.path.getsize(dit),
            "fp8_bytes": fp8_bytes,
            "lora_bytes": os.path.getsize(lora),
            "width": config.inner_dim,
        }
    return models


def full_size_floor() -> float:
    """fp8 floor of the full FramePack DiT (3072 wide, 24 GB in bf16), from its shapes alone."""
    import torch

    from frame_pack.fp8 import is_fp8_target
    from frame_pack.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked, PackedDiTConfig

    with torch.device("meta"):
        state = HunyuanVideoTransformer3DModelPacked(PackedDiTConfig()).state_dict()
    elements = {k: v.numel() for k, v in state.items()}
    return sum(n * (1 if is_fp8_target(k) else 2) for k, n in elements.items()) / (2 * sum(elements.values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=12, help="attention heads of 128 of the mid-size DiT (default 12)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as folder:
        models = write_models(folder, args.heads)
        modes = sorted({m for _, stream, after, _ in VARIANTS for m in (stream, after) if m})
        configs = [
            (f"{size}/{mode}", {**models[size], "mode": mode, "out": os.path.join(folder, "merged.safetensors")})
            for mode in modes
            for size in ("mid", "tiny")
        ]
        peaks = {name: r["peak_mib"] for name, r in run_variants(__file__, configs, env={"OMP_NUM_THREADS": "1"})}
    mid = models["mid"]
    file_mib = mid["file"] / 2**20

    def ratio(mode: str) -> float:
        return (peaks[f"mid/{mode}"] - peaks[f"tiny/{mode}"]) / file_mib

    print(
        f"DiT host memory: width {mid['width']}, 20 double + 40 single blocks, bf16 file {file_mib:.0f} MiB, "
        f"LoRA rank {LORA_RANK} ({mid['lora_bytes'] / 2**20:.1f} MiB); peak RSS growth / file size"
    )
    print(f"  {'':20s} {'streamed':>9s} {'target':>7s} {'after full load':>16s} {'floor':>7s}")
    for name, stream, after, target in VARIANTS:
        floor = 1.0 if stream == "bf16" else mid["fp8_bytes"] / mid["file"]
        if "lora" in stream:
            floor += mid["lora_bytes"] / mid["file"]
        if stream == "save_stream":
            floor = 0.0
        reference = f"{ratio(after):16.3f}" if after else f"{'(same path)':>16s}"
        met = "ok" if ratio(stream) <= target else "MISSED"
        print(f"  {name:20s} {ratio(stream):9.3f} {target:7.2f} {reference} {floor:7.3f}  {met}")
    print(f"  fp8 floor of the full-size FramePack DiT (from its shapes): {full_size_floor():.3f}")


if __name__ == "__main__":
    child_or_main(run_one, main)
