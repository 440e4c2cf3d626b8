"""VMoBA speed: the op against dense SDPA over 8K-120K video tokens, and pipelines against their unpatched selves.

    python benchmarks/vmoba.py op          # selection + block attention vs SDPA, per partition kind
    python benchmarks/vmoba.py threshold --grids 8 32 64   # speed-up against the share kept, tau swept
    python benchmarks/vmoba.py pipeline    # hunyuanvideo-tiny / -arch, flux-tiny: unpatched vs "vmoba"

Op level: random ``[1, S, 4, 64]`` query / key / value on video grids, each of the three default partitions (frames,
patches through all frames, cubes) at threshold τ. The time includes the block selection. Density is the share of
(query, key) pairs kept; the speed of light ``1 / density`` is the speedup of a kernel doing exactly those pairs at
dense attention's rate. Random tensors have flat, structure-free gates, so the kept share here is what τ gives
without the locality of real video attention.

Pipeline: seeded generations, the denoising loop timed (``output_type="latent"``), drift as the PSNR of decoded
frames against unpatched. Medians of ``--repeats``; results in ``benchmarks/results/vmoba-<suite>/``.
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
    median_seconds,
    plot_speedups,
    run_suite,
    save_figure,
    timed_generation,
)

import accel
from accel import metrics
from accel.kernels.vmoba import block_attention_sparse, block_partition, select_blocks
from accel.pipelines.vmoba import default_block_shape

KINDS = ("frames (1-D)", "patches (2-D)", "cubes (3-D)")


def _measure(grid, kind_index, threshold, repeats, heads=4, dim=64) -> dict:
    tokens = math.prod(grid)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, dim, generator=generator) for _ in range(3))
    block = default_block_shape("hunyuanvideo", kind_index)(grid)
    partition = block_partition(grid, block)

    def sparse():
        selected = select_blocks(q, k, partition, threshold)
        return block_attention_sparse(q, k, v, partition, selected), selected

    def dense():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    dense_s = median_seconds(dense, 1 if tokens > 40_000 else repeats)
    sparse_s = median_seconds(sparse, repeats)
    selection_s = median_seconds(lambda: select_blocks(q, k, partition, threshold), repeats)
    _, selected = sparse()
    sizes = (partition.block_tokens >= 0).sum(dim=1).to(torch.float64)
    density = float((selected.to(torch.float64) @ sizes).sum() / (heads * tokens * tokens))
    return {
        "grid": grid,
        "tokens": tokens,
        "partition": KINDS[kind_index],
        "block": [side if s is None else s for side, s in zip(grid, block, strict=True)],
        "blocks": partition.num_blocks,
        "threshold": threshold,
        "density": density,
        "dense_s": dense_s,
        "vmoba_s": sparse_s,
        "selection_s": selection_s,
        "speedup": dense_s / sparse_s,
        "speed_of_light": 1 / density,
        "share_of_light": dense_s / sparse_s * density,
    }


def run_ops(args) -> dict:
    rows = []
    for grid in args.grids:
        for kind in range(3):
            row = _measure(tuple(grid), kind, args.threshold, args.repeats)
            rows.append(row)
            print(
                f"{str(row['grid']):15s} {row['tokens']:6d} tok {row['partition']:14s} {row['blocks']:4d} blocks: "
                f"kept {row['density']:.2f}, SDPA {row['dense_s']:.2f} s, vmoba {row['vmoba_s']:.2f} s "
                f"(selection {row['selection_s']:.2f} s): {row['speedup']:.2f}x of light {row['speed_of_light']:.1f}x",
                flush=True,
            )
    return {"suite": "op", "device": device_name(), "dtype": "fp32", "heads": 4, "head_dim": 64, "rows": rows}


def run_thresholds(args) -> dict:
    """Speed-up against the share of (query, key) pairs kept: tau swept on one grid, each partition."""
    grid = tuple(args.grids[0])
    rows = []
    for threshold in args.thresholds:
        for kind in range(3):
            row = _measure(grid, kind, threshold, args.repeats)
            rows.append(row)
            print(
                f"tau {threshold:4.2f} {row['partition']:14s} kept {row['density']:.3f}: {row['speedup']:5.2f}x "
                f"(light {row['speed_of_light']:5.1f}x, {row['share_of_light']:.0%})",
                flush=True,
            )
    return {"suite": "threshold", "device": device_name(), "dtype": "fp32", "heads": 4, "head_dim": 64, "rows": rows}


PIPELINE_CASES = {
    "hunyuanvideo-tiny": {"height": 512, "width": 1024, "num_frames": 29, "max_sequence_length": 32},
    # 8 x 32 x 64 video tokens (16K), as for the tiny model.
    "hunyuanvideo-arch": {"height": 512, "width": 1024, "num_frames": 29, "max_sequence_length": 64},
    "flux-tiny": {"height": 2048, "width": 2048, "max_sequence_length": 32},
}


def run_pipelines(args) -> dict:
    from accel.cli import parse_options

    rows = []
    options = parse_options(args.option)
    for name in args.models:
        size = PIPELINE_CASES[name]
        pipe = accel.load_pipeline(name, num_blocks=args.num_blocks) if name.endswith("-arch") else None
        pipe = pipe or accel.load_pipeline(name)
        pipe.set_progress_bar_config(disable=True)

        def call(output_type, pipe=pipe, size=size):
            result = pipe(
                prompt="a red circle and a blue square",
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(0),
                output_type=output_type,
                **size,
            )
            return np.asarray(result.frames if hasattr(result, "frames") else result.images, dtype=np.float32)

        unpatched_s, unpatched = timed_generation(call, args.repeats)
        with accel.patched(pipe, "vmoba", **options):
            vmoba_s, patched = timed_generation(call, args.repeats)
        row = {
            "model": name,
            "dtype": str(pipe.transformer.dtype),
            "size": size,
            "steps": args.steps,
            "options": options,
            "unpatched_s": unpatched_s,
            "vmoba_s": vmoba_s,
            "speedup": unpatched_s / vmoba_s,
            "psnr_db_vs_unpatched": metrics.psnr(unpatched, patched),
        }
        rows.append(row)
        print(
            f"{name:18s} {size}: unpatched {unpatched_s:.2f} s, vmoba {vmoba_s:.2f} s ({row['speedup']:.2f}x), "
            f"PSNR {row['psnr_db_vs_unpatched']:.1f} dB",
            flush=True,
        )
        del pipe
    return {"suite": "pipeline", "device": device_name(), "dtype": "per row", "rows": rows}


def _plot(result: dict, path: Path) -> None:
    rows = result["rows"]
    if result["suite"] == "threshold":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for index, kind in enumerate(KINDS):
            mine = [r for r in rows if r["partition"] == kind]
            ax.plot([r["density"] for r in mine], [r["speedup"] for r in mine], "o-", color=f"C{index}", label=kind)
        shares = sorted(r["density"] for r in rows)
        ax.plot(shares, [1 / d for d in shares], "k--", alpha=0.6, label="speed of light (1 / kept share)")
        for r in rows:
            ax.annotate(f"{r['threshold']:g}", (r["density"], r["speedup"]), fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("share of (query, key) pairs kept (labels: tau)")
        ax.set_ylabel("x faster than dense SDPA")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.set_title(
            f"VMoBA op vs kept share, {rows[0]['tokens']} tokens {tuple(rows[0]['grid'])}, {result['device']}, fp32, "
            "4 heads x 64; baseline: dense SDPA",
            fontsize=8,
        )
        save_figure(fig, path)
        return
    if result["suite"] == "op":
        labels = [f"{r['tokens'] // 1000}K {r['partition'].split()[0]}" for r in rows]
        bars = [
            ("VMoBA (selection included)", [r["speedup"] for r in rows]),
            ("speed of light (1 / kept share)", [r["speed_of_light"] for r in rows]),
        ]
        title = (
            f"VMoBA op on {result['device']}, fp32, 4 heads x 64, tau {rows[0]['threshold']}; "
            "baseline: dense SDPA (1.0 = break-even)"
        )
    else:
        labels = [r["model"] for r in rows]
        bars = [("accel vmoba", [r["speedup"] for r in rows])]
        title = f"VMoBA end to end on {result['device']}; baseline: the unpatched pipeline (denoising loop)"
    plot_speedups(path, labels, bars, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["op", "threshold", "pipeline"])
    parser.add_argument(
        "--grids",
        type=int,
        nargs=3,
        action="append",
        default=None,
        metavar=("T", "H", "W"),
        help="video token grids (op); default 8x32x32, 8x32x64, 16x48x80, 30x48x80 (8K-115K tokens)",
    )
    parser.add_argument("--threshold", type=float, default=0.25)
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 0.75], help="threshold suite"
    )
    parser.add_argument("--models", nargs="+", default=["hunyuanvideo-tiny"], choices=list(PIPELINE_CASES))
    parser.add_argument("--num-blocks", type=int, default=1, help="transformer blocks of hunyuanvideo-arch")
    add_common_arguments(parser, "vmoba")
    args = parser.parse_args(argv)
    args.grids = args.grids or [[8, 32, 32], [8, 32, 64], [16, 48, 80], [30, 48, 80]]
    suites = {"op": run_ops, "threshold": run_thresholds, "pipeline": run_pipelines}
    return run_suite(args, suites, "vmoba", _plot)


if __name__ == "__main__":
    raise SystemExit(main())
