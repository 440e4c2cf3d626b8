"""Agent attention speed and fidelity: the op and the layer against dense, whole pipelines against tomesd.

    python benchmarks/agent.py op          # agent attention vs SDPA at 4K-64K tokens; AgentSD layer vs dense layer
    python benchmarks/agent.py pipeline    # unpatched vs accel "agent" vs tomesd, tiny and real-width models

Op level, on random ``[1, N, 8, 40]`` tensors (SD 1.5's top level: 320 channels, 8 heads of 40):
- ``op``: dense ``scaled_dot_product_attention`` vs agent attention with ``N / 16`` grid-pooled agents (pooling
  included). Speed of light: dense does ``N²`` (query, key) pairs, agents ``2 N n``, so ``N / (2 n)`` = 8x.
- ``layer``: one real-width self-attention layer (projections included) run by the dense processor vs by the
  AgentSD processor in its agent phase (token matching, 40 % merged, merged-query agents, unmerge all included).

Pipeline: seeded generations of the denoising loop (``output_type="latent"``; with ``--repeats 1``, for real-width
models that take minutes a call, one call including the VAE decode after an untimed warm-up call) unpatched, with
``accel.patch(pipe, "agent", ...)`` and, where it is installed, with ``tomesd.apply_patch`` (ratio 0.5; on SDXL
``max_downsample=2``, without which it merges nothing there); drift is the PSNR of decoded images against the
unpatched ones. tomesd is a peer, not a dependency: ``pip install tomesd``.

Every number is a median of ``--repeats`` runs taken alone with ``torch.set_num_threads``; results go to
``benchmarks/results/agent-<suite>/`` as JSON and PNG.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import add_common_arguments, device_name, median_seconds, plot_speedups, run_suite, timed_generation
from peers import tomesd_patch

import accel
from accel import metrics
from accel.kernels.agent import agent_attention, grid_pool, pooled_grid


def _layer_processors(tokens: int, dtype: torch.dtype):
    from diffusers.models.attention_processor import Attention

    from accel.config import AgentConfig
    from accel.pipelines.agent import settings_for
    from accel.processors.agent import AgentAttnProcessor
    from accel.processors.dense import DenseAttnProcessor
    from accel.processors.state import LatentLayout, PatchContext, StepState

    side = math.isqrt(tokens)
    context = PatchContext(
        family="unet",
        step=StepState(timestep=999.0, step_index=0, num_steps=10, progress=0.0),
        layout=LatentLayout(grid=(side, side)),
    )
    attn = Attention(query_dim=320, heads=8, dim_head=40, bias=False).to(dtype).eval()
    settings = settings_for(AgentConfig(), "unet")  # AgentSD's recipe; the context puts it in the agent phase
    return attn, DenseAttnProcessor(context, "layer"), AgentAttnProcessor(context, "layer", settings)


def _measure_tokens(tokens: int, dtype: torch.dtype, repeats: int) -> dict:
    side = math.isqrt(tokens)
    grid = (side, side)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tokens, 8, 40, generator=generator).to(dtype) for _ in range(3))
    pooled = pooled_grid(grid, 1 / 16)
    scale = 40**-0.5

    def dense():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    def agents():
        pooled_q, _ = grid_pool(q, grid, pooled)
        return agent_attention(q, k, v, pooled_q, scale=scale, agent_scale=scale**0.3, shortcut=0.075)

    attn, dense_processor, agent_processor = _layer_processors(tokens, dtype)
    hidden = torch.randn(2, tokens, 320, generator=generator).to(dtype)
    with torch.no_grad():
        dense_s = median_seconds(dense, repeats)
        agent_s = median_seconds(agents, repeats)
        layer_dense_s = median_seconds(lambda: dense_processor(attn, hidden), repeats)
        layer_agent_s = median_seconds(lambda: agent_processor(attn, hidden), repeats)
    agent_count = math.prod(pooled)
    return {
        "tokens": tokens,
        "grid": grid,
        "agents": agent_count,
        "repeats": repeats,
        "dense_s": dense_s,
        "agent_s": agent_s,
        "speedup": dense_s / agent_s,
        "speed_of_light": tokens / (2 * agent_count),
        "layer_batch": 2,
        "layer_dense_s": layer_dense_s,
        "layer_agentsd_s": layer_agent_s,
        "layer_speedup": layer_dense_s / layer_agent_s,
    }


def run_ops(args) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = []
    for tokens in args.tokens:
        # Dense attention at 64K tokens takes about a minute here: one repeat there.
        row = _measure_tokens(tokens, dtype, 1 if tokens > 16384 else args.repeats)
        rows.append(row)
        print(
            f"{tokens:6d} tokens, {row['agents']} agents: SDPA {row['dense_s']:.3f} s, agents {row['agent_s']:.3f} s "
            f"({row['speedup']:.1f}x, light {row['speed_of_light']:.0f}x) | layer (batch 2): dense "
            f"{row['layer_dense_s']:.3f} s, AgentSD {row['layer_agentsd_s']:.3f} s ({row['layer_speedup']:.1f}x)",
            flush=True,
        )
    return {"suite": "op", "device": device_name(), "dtype": args.dtype, "heads": 8, "head_dim": 40, "rows": rows}


# model -> generation sizes to run
PIPELINE_SIZES = {
    "sd15-tiny": [1024],
    "sdxl-tiny": [1024],
    "sd15-arch": [1024],
    "sdxl-arch": [1024],
    "flux-tiny": [2048],
    "flux-arch": [2048],
}


def run_pipelines(args) -> dict:
    rows = []
    for name in args.models:
        arch = name.endswith("-arch")
        kwargs = {"num_blocks": args.num_blocks} if arch and name.startswith("flux") else {}
        pipe = accel.load_pipeline(name, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        options = _parse(args.option)
        for size in args.sizes or PIPELINE_SIZES[name]:
            extra = {"max_sequence_length": 32} if name.startswith("flux") else {}

            def call(output_type, pipe=pipe, size=size, extra=extra):
                return pipe(
                    prompt="a red circle and a blue square",
                    height=size,
                    width=size,
                    num_inference_steps=args.steps,
                    generator=torch.Generator().manual_seed(0),
                    output_type=output_type,
                    **extra,
                ).images

            def measure(call=call):
                return timed_generation(call, args.repeats)

            unpatched_s, unpatched_image = measure()
            with accel.patched(pipe, "agent", **options):
                agent_s, agent_image = measure()
            row = {
                "model": name,
                "dtype": str((pipe.unet if hasattr(pipe, "unet") else pipe.transformer).dtype),
                "size": size,
                "steps": args.steps,
                "timed": "one warm call, denoising + VAE decode" if args.repeats == 1 else "denoising loop, median",
                "agent_options": options,
                "unpatched_s": unpatched_s,
                "agent_s": agent_s,
                "agent_speedup": unpatched_s / agent_s,
                "agent_psnr_db": metrics.psnr(unpatched_image, agent_image),
            }
            remove = tomesd_patch(pipe, name)
            if remove is not None:
                try:
                    tome_s, tome_image = measure()
                finally:
                    remove()
                row.update(
                    tomesd_s=tome_s,
                    tomesd_speedup=unpatched_s / tome_s,
                    tomesd_psnr_db=metrics.psnr(unpatched_image, tome_image),
                )
            rows.append(row)
            tome = (
                f" | tomesd {row['tomesd_s']:.2f} s ({row['tomesd_speedup']:.2f}x, {row['tomesd_psnr_db']:.1f} dB)"
                if "tomesd_s" in row
                else ""
            )
            print(
                f"{name:10s} {size}px {args.steps} steps: unpatched {unpatched_s:.2f} s | agent {agent_s:.2f} s "
                f"({row['agent_speedup']:.2f}x, {row['agent_psnr_db']:.1f} dB){tome}",
                flush=True,
            )
        del pipe
    return {"suite": "pipeline", "device": device_name(), "dtype": "per row", "rows": rows}


def _parse(pairs):
    from accel.cli import parse_options

    return parse_options(pairs)


def _plot(result: dict, path: Path) -> None:
    rows = result["rows"]
    if result["suite"] == "op":
        labels = [f"{r['tokens']} tokens" for r in rows]
        fields = [
            ("agent attention vs SDPA", "speedup"),
            ("speed of light N/(2n)", "speed_of_light"),
            ("AgentSD layer vs dense layer", "layer_speedup"),
        ]
        title = (
            f"Agent attention on {result['device']}, {result['dtype']}, 8 heads x 40, N/16 agents; "
            "baselines: dense SDPA (op), the dense processor (layer, batch 2)"
        )
    else:
        labels = [f"{r['model']} {r['size']}px" for r in rows]
        fields = [("accel agent", "agent_speedup"), ("tomesd", "tomesd_speedup")]
        title = f"Denoising loop on {result['device']}; baseline: the unpatched pipeline (dtype per model)"
    bars = [(label, [r.get(field, np.nan) for r in rows]) for label, field in fields]
    plot_speedups(path, labels, bars, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["op", "pipeline"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="op suite")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536], help="op suite (squares)")
    parser.add_argument("--models", nargs="+", default=list(PIPELINE_SIZES), choices=list(PIPELINE_SIZES))
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="pipeline sizes (default per model)")
    parser.add_argument("--num-blocks", type=int, default=1, help="transformer blocks of flux-arch")
    add_common_arguments(parser, "agent")
    args = parser.parse_args(argv)
    return run_suite(args, {"op": run_ops, "pipeline": run_pipelines}, "agent", _plot)


if __name__ == "__main__":
    raise SystemExit(main())
