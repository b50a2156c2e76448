"""Harness shared by the bench scripts: each variant runs in a fresh subprocess so its peak memory is its own."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys


def peak_mib(cuda: bool) -> float:
    """CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident set size."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> float:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS), so
    a transient peak of the imports before it does not count; returns the RSS now in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """Peak RSS since the last `reset_peak_rss` (VmHWM), in MiB."""
    return _status_kib("VmHWM") / 1024


def run_variants(script: str, configs: list[tuple[str, dict]], env: dict | None = None) -> list[tuple[str, dict]]:
    """Run `script --child <json cfg>` per variant; each child prints one JSON result as its last line."""
    results = []
    for name, cfg in configs:
        out = subprocess.run(
            [sys.executable, script, "--child", json.dumps(cfg)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **(env or {})},
        )
        results.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    return results


def child_or_main(run_one, main) -> None:
    """Entry point: `--child <json>` runs one variant (its own prints go to stderr), otherwise the comparison."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        with contextlib.redirect_stdout(sys.stderr):
            result = run_one(json.loads(sys.argv[2]))
        print(json.dumps(result))
    else:
        main()


def print_ratios(results: list[tuple[str, dict]], columns: list[tuple[str, str, str]], width: int = 20) -> None:
    """One line per variant; columns are (result key, label, unit), each with its ratio to the first variant."""
    first = results[0][1]
    for name, r in results:
        cells = [f"{label}{r[key]:9.3f}{unit} ({r[key] / first[key]:.2f}x)" for key, label, unit in columns]
        print(f"  {name:{width}s} " + "   ".join(cells))


def add_dit_size_flags(parser, text_dim: int) -> None:
    """`--width`, `--double`, `--single`, `--text_dim`: the size of a random DiT (defaults: a small one)."""
    parser.add_argument("--width", type=int, default=256, help="DiT inner width, a multiple of 128 (full model: 3072)")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (full: 20)")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks (full: 40)")
    parser.add_argument("--text_dim", type=int, default=text_dim, help="LLaMA feature width (full: 4096)")


def add_section_size_flags(parser, height: int, width: int) -> None:
    """`--height`, `--width_px`, `--lws`, `--text_tokens`: the size of one section's inputs."""
    parser.add_argument("--height", type=int, default=height, help="video height in pixels")
    parser.add_argument("--width_px", type=int, default=width, help="video width in pixels")
    parser.add_argument("--lws", type=int, default=9, help="latent window size (latent frames per section)")
    parser.add_argument("--text_tokens", type=int, default=64, help="valid prompt tokens")
