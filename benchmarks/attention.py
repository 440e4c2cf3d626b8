"""GNA speed: the attention op against dense SDPA, and whole pipelines against their unpatched selves.

    python benchmarks/attention.py op            # op level: GNA vs SDPA, speedup and share of the speed of light
    python benchmarks/attention.py pipeline      # end to end: flux / hunyuanvideo, tiny and real-width

Op level: for each shape, dense ``scaled_dot_product_attention`` and GNA (the torch tiled path on CPU, the Triton
kernel on CUDA) on the same random ``[B, S, H, D]`` tensors. The speed of light is ``1 / density``: the speedup a
kernel would reach if it did exactly the attended (query, key) pairs at dense attention's rate. GPU shapes are
NATTEN's published FLUX-4K and HunyuanVideo problems; CPU shapes are sized for a 2-core machine.

Pipeline: seeded generations, unpatched vs ``accel.patch(pipe, "gna", ...)``, timing the denoising loop
(``output_type="latent"``) and reporting drift (PSNR of decoded frames) at a smaller step count.

Every number is a median of ``--repeats`` runs, taken alone on the machine with ``torch.set_num_threads``;
results go to ``benchmarks/results/attention-<suite>/`` as JSON and PNG.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    add_common_arguments,
    device_name,
    interleaved_median_seconds,
    median_seconds,
    run_suite,
    save_figure,
    timed_generation,
)

import accel
from accel import metrics
from accel.kernels.agent import agent_attention, grid_pool, pooled_grid
from accel.kernels.neighborhood import Neighborhood, neighborhood_attention_tiled
from accel.kernels.vmoba import block_attention_sparse, block_partition, select_blocks
from accel.kernels.windows import shifted_window_attention
from accel.pipelines.gna import flux_default_geometry
from accel.pipelines.vmoba import default_block_shape

# Sides of the square 2-D grids of the sweep: 1K, 2K, 4K, ... tokens.
SWEEP_SIDES = [32, 45, 64, 90, 128, 181, 256, 362, 512]

# name, grid, kernel_size, stride, heads, head_dim
CPU_SHAPES = [
    ("2d 128x128 w32 s16 (block-aligned)", (128, 128), (32, 32), (16, 16), 4, 64),
    ("2d 128x128 w33 s1 (standard NA)", (128, 128), (33, 33), (1, 1), 4, 64),
    ("2d 128x128 w40 s8", (128, 128), (40, 40), (8, 8), 4, 64),
    ("3d 8x32x64 w4x16x16 s4x8x8", (8, 32, 64), (4, 16, 16), (4, 8, 8), 4, 64),
    ("2d 64x64 w16 s8", (64, 64), (16, 16), (8, 8), 4, 64),
]
# NATTEN's two GPU problems at their full token counts, one head of 128 (dense SDPA takes 20-60 s a call here).
CPU_LARGE_SHAPES = [
    ("FLUX-4K 256x256 w80 s16, 1 head", (256, 256), (80, 80), (16, 16), 1, 128),
    ("HunyuanVideo 30x48x80 w18x24x24 s16x8x8, 1 head", (30, 48, 80), (18, 24, 24), (16, 8, 8), 1, 128),
]
GPU_SHAPES = [
    ("FLUX-4K 256x256 w80 s16", (256, 256), (80, 80), (16, 16), 24, 128),
    ("HunyuanVideo 30x48x80 w18x24x24 s16x8x8", (30, 48, 80), (18, 24, 24), (16, 8, 8), 24, 128),
    *CPU_SHAPES,
]


def _measure_shape(name, grid, kernel, stride, heads, dim, device, dtype, repeats, sync) -> dict:
    hood = Neighborhood.create(grid, kernel, stride)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, hood.tokens, heads, dim, generator=generator).to(device, dtype) for _ in range(3))

    def dense():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    if device == "cuda":
        from accel.kernels.block_sparse import block_sparse_attention

        def sparse():
            return block_sparse_attention(q, k, v, hood)[0]

        path = "triton block-sparse kernel"
    else:

        def sparse():
            return neighborhood_attention_tiled(q, k, v, hood)

        path = "torch: key strips + SDPA per tile row"
    timings = interleaved_median_seconds({"dense": dense, "gna": sparse}, repeats, sync)
    dense_s, sparse_s = timings["dense"], timings["gna"]
    density = hood.density()
    speedup = dense_s / sparse_s
    row = {
        "shape": name,
        "grid": grid,
        "tokens": hood.tokens,
        "kernel_size": kernel,
        "stride": stride,
        "heads": heads,
        "head_dim": dim,
        "density": density,
        "dense_ms": dense_s * 1e3,
        "gna_ms": sparse_s * 1e3,
        "speedup": speedup,
        "speed_of_light": 1 / density,
        "share_of_speed_of_light": speedup * density,
        "path": path,
    }
    print(
        f"{name:42s} {hood.tokens:6d} tok  density {density:6.3f}  dense {dense_s * 1e3:9.1f} ms  "
        f"gna {sparse_s * 1e3:8.1f} ms  speedup {speedup:5.2f}x  of light {speedup * density:5.1%}",
        flush=True,
    )
    return row


def run_ops(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES + (CPU_LARGE_SHAPES if args.large else [])
    rows = [
        _measure_shape(name, grid, kernel, stride, heads, dim, device, dtype, args.repeats, sync)
        for name, grid, kernel, stride, heads, dim in shapes
    ]
    return {"suite": "op", "device": device_name(device), "dtype": args.dtype, "batch": 1, "rows": rows}


def _sweep_methods(q, k, v, grid, device):
    """Each method's op on the same ``[1, S, H, D]`` tensors over a 2-D ``grid``, with its default settings:
    ``name -> (callable, density)``; the speed of light is ``1 / density``, the share of (query, key) work kept."""
    tokens, dim = q.shape[1], q.shape[-1]
    kernel, stride = flux_default_geometry(grid)
    hood = Neighborhood.create(grid, kernel, stride)
    if device == "cuda":
        from accel.kernels.block_sparse import block_sparse_attention

        def gna():
            return block_sparse_attention(q, k, v, hood)[0]

    else:

        def gna():
            return neighborhood_attention_tiled(q, k, v, hood)

    partition = block_partition(grid, default_block_shape("flux", 0)(grid))

    def vmoba():
        return block_attention_sparse(q, k, v, partition, select_blocks(q, k, partition, 0.25))

    selected = select_blocks(q, k, partition, 0.25)
    sizes = (partition.block_tokens >= 0).sum(dim=1).to(torch.float64)
    vmoba_density = float((selected.to(torch.float64) @ sizes.to(selected.device)).sum() / (q.shape[2] * tokens**2))

    pooled = pooled_grid(grid, 1 / 16)
    scale = dim**-0.5

    def agent():
        agents, _ = grid_pool(q, grid, pooled)
        return agent_attention(q, k, v, agents, scale=scale, agent_scale=scale**0.3, shortcut=0.075)

    quarter = (grid[0] // 8, grid[1] // 8)

    def mswmsa():
        return shifted_window_attention(q, k, v, grid, (2, 2), shift=quarter)

    return {
        "gna": (gna, hood.density()),
        "vmoba": (vmoba, vmoba_density),
        # Two products of N x n instead of one N x N: 2n / N of dense attention's multiply-adds.
        "agent": (agent, 2 * math.prod(pooled) / tokens),
        "mswmsa": (mswmsa, 1 / 4),
    }


def run_sweep(args) -> dict:
    """Every method against SDPA on square 2-D grids from 1K tokens up to ``--max-tokens``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    heads, dim = (24, 128) if device == "cuda" else (4, 64)
    max_tokens = args.max_tokens or (4096 if args.quick else 262_144 if device == "cuda" else 32_768)
    sides = [side for side in SWEEP_SIDES if side * side <= max_tokens]
    repeats = 1 if args.quick else args.repeats
    rows = []
    for side in sides:
        grid = (side, side)
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, side * side, heads, dim, generator=generator).to(device, dtype) for _ in range(3))

        def dense(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

        # Dense attention at 32K tokens takes over ten seconds a call on two cores: fewer repeats there.
        size_repeats = repeats if device == "cuda" or side * side <= 16_384 else 1
        with torch.no_grad():
            dense_s = median_seconds(dense, size_repeats, sync)
            for method, (fn, density) in _sweep_methods(q, k, v, grid, device).items():
                seconds = median_seconds(fn, size_repeats, sync)
                row = {
                    "method": method,
                    "grid": grid,
                    "tokens": side * side,
                    "density": density,
                    "dense_ms": dense_s * 1e3,
                    "method_ms": seconds * 1e3,
                    "speedup": dense_s / seconds,
                    "speed_of_light": 1 / density,
                    "share_of_speed_of_light": dense_s / seconds * density,
                    "repeats": size_repeats,
                }
                rows.append(row)
                print(
                    f"{side * side:7d} tok  {method:7s} dense {dense_s * 1e3:9.1f} ms  {seconds * 1e3:9.1f} ms  "
                    f"{row['speedup']:5.2f}x of light {1 / density:5.1f}x ({row['share_of_speed_of_light']:5.1%})",
                    flush=True,
                )
    return {
        "suite": "sweep",
        "device": device_name(device),
        "dtype": args.dtype,
        "batch": 1,
        "heads": heads,
        "head_dim": dim,
        "baseline": f"dense SDPA on the same [1, S, {heads}, {dim}] tensors",
        "settings": {
            "gna": "FLUX default: kernel 5/16 of each side, stride kernel/5",
            "vmoba": "FLUX default blocks (1/16 of each side, grown to >= 1024 tokens), threshold 0.25, incl. selection",
            "agent": "agents = queries grid-pooled to N/16, incl. pooling",
            "mswmsa": "2x2 shifted windows (HiDiffusion's MSW-MSA)",
        },
        "rows": rows,
    }


def _plot_sweep(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for index, method in enumerate(methods):
        rows = [r for r in result["rows"] if r["method"] == method]
        colour = f"C{index}"
        ax.plot([r["tokens"] for r in rows], [r["speedup"] for r in rows], "o-", color=colour, label=method)
        ax.plot(
            [r["tokens"] for r in rows],
            [r["speed_of_light"] for r in rows],
            "--",
            color=colour,
            alpha=0.6,
            label=f"{method} speed of light",
        )
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("image tokens (square 2-D grid)")
    ax.set_ylabel("x faster than dense SDPA")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(
        f"attention op on {result['device']}, {result['dtype']}, {result['heads']} heads x {result['head_dim']}; "
        f"baseline: {result['baseline']}",
        fontsize=8,
    )
    save_figure(fig, path)


# model, generation size, GNA options, steps for timing
PIPELINE_CASES = {
    "flux-tiny": ({"height": 2048, "width": 2048, "max_sequence_length": 32}, {}),
    "hunyuanvideo-tiny": ({"height": 512, "width": 1024, "num_frames": 29, "max_sequence_length": 32}, {}),
    # Real widths at the tiny models' 16K visual tokens; with --repeats 1, one call each after a warm-up call (text
    # encoding and decode included), as they take minutes.
    "flux-arch": ({"height": 2048, "width": 2048, "max_sequence_length": 64}, {}),
    "hunyuanvideo-arch": ({"height": 512, "width": 1024, "num_frames": 29, "max_sequence_length": 64}, {}),
}


def run_pipelines(args) -> dict:
    rows = []
    for model in args.models:
        size, options = PIPELINE_CASES[model]
        arch = model.endswith("-arch")
        pipe = accel.load_pipeline(model, num_blocks=args.num_blocks) if arch else accel.load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        options = {**options, **_parse(args.option)}

        def call(output_type, pipe=pipe, size=size):
            result = pipe(
                prompt="a red circle and a blue square",
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(0),
                output_type=output_type,
                **size,
            )
            return result.frames if hasattr(result, "frames") else result.images

        unpatched_s, unpatched_image = timed_generation(call, args.repeats)
        with accel.patched(pipe, "gna", **options):
            processor = next(p for p in pipe.transformer.attn_processors.values() if hasattr(p, "_neighborhoods"))
            patched_s, patched_image = timed_generation(call, args.repeats)
            # The step hook forgets the layout after each call; the processor keeps the geometry it used.
            ((grid, hood),) = processor._neighborhoods.items()
        row = {
            "model": model,
            "num_blocks": args.num_blocks if arch else None,
            "dtype": str(pipe.transformer.dtype),
            "size": size,
            "grid": grid,
            "visual_tokens": int(np.prod(grid)),
            "kernel_size": hood.kernel_size,
            "stride": hood.stride,
            "density": hood.density(),
            "steps": args.steps,
            "unpatched_s": unpatched_s,
            "gna_s": patched_s,
            "speedup": unpatched_s / patched_s,
            "psnr_db_vs_unpatched": metrics.psnr(unpatched_image, patched_image),
        }
        rows.append(row)
        print(
            f"{model:18s} grid {grid} ({row['visual_tokens']} tok) kernel {hood.kernel_size} stride {hood.stride}: "
            f"unpatched {unpatched_s:.2f} s  gna {patched_s:.2f} s  speedup {row['speedup']:.2f}x  "
            f"PSNR {row['psnr_db_vs_unpatched']:.1f} dB",
            flush=True,
        )
        del pipe
    return {"suite": "pipeline", "device": device_name("cpu"), "dtype": "per row", "rows": rows}


def _parse(pairs):
    from accel.cli import parse_options

    return parse_options(pairs)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(10, 4))
    labels = [r.get("shape") or r["model"] for r in rows]
    positions = np.arange(len(rows))
    ax.bar(positions - 0.2, [r["speedup"] for r in rows], 0.4, label="measured speedup")
    if result["suite"] == "op":
        ax.bar(positions + 0.2, [r["speed_of_light"] for r in rows], 0.4, label="speed of light (1 / density)")
        heads = {(r["heads"], r["head_dim"]) for r in rows}
        baseline = "dense SDPA, batch 1, " + ", ".join(f"{h} heads x {d}" for h, d in sorted(heads))
    else:
        baseline = "the unpatched pipeline (denoising loop)"
    ax.set_xticks(positions, labels, rotation=15, ha="right", fontsize=7)
    ax.set_ylabel("x faster than the baseline")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"GNA {result['suite']} on {result['device']}, {result['dtype']}; baseline: {baseline}", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["sweep", "op", "pipeline"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--models", nargs="+", default=list(PIPELINE_CASES), choices=list(PIPELINE_CASES))
    parser.add_argument("--num-blocks", type=int, default=1, help="transformer blocks of the *-arch models")
    parser.add_argument("--max-tokens", type=int, default=None, help="sweep: largest grid (default CPU 32K, GPU 256K)")
    parser.add_argument("--quick", action="store_true", help="sweep: 1K-4K tokens, one run each (CI smoke)")
    parser.add_argument("--large", action="store_true", help="op on CPU: add the FLUX-4K and HunyuanVideo problems")
    add_common_arguments(parser, "gna")
    args = parser.parse_args(argv)
    if args.quick and args.suite != "sweep":
        parser.error("--quick applies to the sweep suite")
    if args.quick and args.out is None:
        args.out = "benchmarks/results/attention-sweep-quick"

    def plot(result, path):
        (_plot_sweep if result["suite"] == "sweep" else _plot)(result, path)

    return run_suite(args, {"sweep": run_sweep, "op": run_ops, "pipeline": run_pipelines}, "attention", plot)


if __name__ == "__main__":
    raise SystemExit(main())
