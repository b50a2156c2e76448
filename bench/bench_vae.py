"""Time and peak memory of VAE encode/decode: untiled vs spatial tiling vs width chunking (and both).

Each (configuration, operation) runs in a fresh subprocess, so peaks do not mix. On CPU the peak is the process's
resident-set high-water mark (VmHWM, reset just before the operation where Linux allows it, else ru_maxrss)
minus the resident set before it; on CUDA it is torch.cuda.max_memory_allocated above the memory already held.
Ratios are against the untiled run of this same invocation. Weights are the tiny-factory initialisation (random,
trained-like scale) at the requested widths; timings do not depend on the values.

    .venv/bin/python bench/bench_vae.py                      # ~1 min on 2 CPU cores
    .venv/bin/python bench/bench_vae.py --size 512 --frames 17 --channels 128,256,512,512 --layers 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MB = 1024 * 1024


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    hwm = _rss_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> dict:
    """Build the VAE, run one operation `--repeat` times, return seconds (best) and extra peak bytes."""
    import torch

    from hunyuan_model.vae import AutoencoderKLCausal3D, VAEConfig
    from tests.factory.vae import init_vae_weights_

    torch.manual_seed(0)
    channels = tuple(int(c) for c in args.channels.split(","))
    config = VAEConfig(block_out_channels=channels, layers_per_block=args.layers, latent_channels=args.latent_channels)
    dtype = getattr(torch, args.dtype)
    model = init_vae_weights_(AutoencoderKLCausal3D(config)).to(args.device, dtype).eval().requires_grad_(False)
    model.set_chunk_size(args.chunk or None)
    model.set_spatial_tiling(args.tile or None)

    if args.op == "encode":
        data = torch.rand(1, 3, args.frames, args.size, args.size) * 2 - 1
        run = lambda: model.encode(data, torch.Generator().manual_seed(0))
    else:
        t = (args.frames - 1) // 4 + 1
        s = args.size // 8
        data = torch.randn(1, args.latent_channels, t, s, s) * 0.5
        run = lambda: model.decode(data)
    data = data.to(args.device, dtype)

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        before = _rss_bytes("VmRSS") or _peak_bytes()
    best = float("inf")
    with torch.no_grad():
        for _ in range(args.repeat):
            start = time.perf_counter()
            out = run()
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
            shape = tuple(out.shape)
            del out
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_bytes()
    return {"seconds": best, "peak_extra": max(peak - before, 0), "shape": shape}


def configurations(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(name, tile px or 0, chunk or 0); the first is the untiled baseline."""
    return [
        ("untiled", 0, 0),
        (f"tiled {args.tile}px", args.tile, 0),
        (f"chunked {args.chunk}", 0, args.chunk),
        (f"tiled {args.tile}px + chunked {args.chunk}", args.tile, args.chunk),
    ]


def run_in_subprocess(args: argparse.Namespace, op: str, tile: int, chunk: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--op", op]
    cmd += ["--tile", str(tile), "--chunk", str(chunk)]
    for name in ("size", "frames", "channels", "layers", "latent_channels", "dtype", "device", "repeat"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({' '.join(cmd)}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="square pixel size (multiple of 8)")
    parser.add_argument("--frames", type=int, default=9, help="pixel frames, 1 + 4k")
    parser.add_argument("--channels", default="32,64,128,128", help="block_out_channels (real VAE: 128,256,512,512)")
    parser.add_argument("--layers", type=int, default=1, help="layers_per_block (real VAE: 2)")
    parser.add_argument("--latent-channels", type=int, default=16)
    parser.add_argument("--tile", type=int, default=128, help="--vae_spatial_tile_sample_min_size to compare")
    parser.add_argument("--chunk", type=int, default=32, help="--vae_chunk_size to compare")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best time is kept")
    parser.add_argument("--ops", default="encode,decode")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=["encode", "decode"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return

    print(
        f"VAE channels {args.channels}, layers {args.layers}, {args.frames} frames of {args.size}x{args.size} px, "
        f"{args.dtype} on {args.device}; peak = memory above what was held before the call"
    )
    header = f"{'op':<7} {'configuration':<30} {'seconds':>8} {'peak MB':>9} {'time x':>7} {'peak x':>7}"
    for op in args.ops.split(","):
        print(header)
        base = None
        for name, tile, chunk in configurations(args):
            r = run_in_subprocess(args, op, tile, chunk)
            base = base or r
            time_ratio = r["seconds"] / base["seconds"]
            peak_ratio = r["peak_extra"] / base["peak_extra"] if base["peak_extra"] else float("nan")
            print(
                f"{op:<7} {name:<30} {r['seconds']:>8.2f} {r['peak_extra'] / MB:>9.1f} "
                f"{time_ratio:>7.2f} {peak_ratio:>7.2f}"
            )
        print()


if __name__ == "__main__":
    main()
