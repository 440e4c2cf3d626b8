"""One rank of the context-parallel test: ``torchrun --nproc-per-node 2 tests/cp_worker.py --out DIR``.

Each rank builds the same seeded tiny pipeline, generates with each accel method on one process (the reference),
then turns on diffusers' Ulysses context parallelism over gloo and generates again; rank 0 writes the largest
difference of each case to ``DIR/cp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import accel

CASES = {
    "flux-tiny": [
        ("unpatched", {}),
        ("dense", {}),
        ("gna", {"kernel_size": 7, "stride": 1}),
        ("agent", {}),
        ("vmoba", {"blocks": [[4, 4]], "threshold": 0.25}),
    ],
    "hunyuanvideo-tiny": [
        ("unpatched", {}),
        ("dense", {}),
        ("gna", {"kernel_size": [3, 5, 5], "stride": 1}),
        ("agent", {}),
        ("vmoba", {"blocks": [[1, None, None], [None, 4, 4]], "threshold": 0.25}),
    ],
}
CALLS = {
    "flux-tiny": {"height": 256, "width": 256, "max_sequence_length": 32},
    # 3 latent frames of 8x8 patches; the prompt is padded to 32 tokens, so the text mask matters.
    "hunyuanvideo-tiny": {"height": 128, "width": 128, "num_frames": 9, "max_sequence_length": 32},
}


def allow_enable_parallelism_on_cpu() -> None:
    """diffusers' ``enable_parallelism`` picks the device as ``rank % torch.accelerator.device_count()``, which
    divides by zero on a CPU-only host; with a count of 1 it resolves to the CPU, and the rest of it (the gloo mesh,
    the processors' config, the split / gather hooks) runs as it would on GPUs."""
    torch.accelerator.device_count = lambda: 1


def generate(pipe, model: str, method: str, options: dict) -> torch.Tensor:
    def run():
        result = pipe(
            prompt="a red circle and a blue square",
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **CALLS[model],
        )
        return (result.frames if hasattr(result, "frames") else result.images).clone()

    if method == "unpatched":
        return run()
    with accel.patched(pipe, method, **options):
        return run()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", default=list(CASES))
    args = parser.parse_args()
    dist.init_process_group("gloo")
    allow_enable_parallelism_on_cpu()
    torch.set_num_threads(1)
    results = {}
    try:
        for model in args.models:
            pipe = accel.load_pipeline(model)
            pipe.set_progress_bar_config(disable=True)
            references = {method: generate(pipe, model, method, options) for method, options in CASES[model]}
            from diffusers import ContextParallelConfig

            accel.enable_context_parallel(pipe, ContextParallelConfig(ulysses_degree=dist.get_world_size()))
            for method, options in CASES[model]:
                output = generate(pipe, model, method, options)
                results[f"{model}/{method}"] = float((output - references[method]).abs().max())
            # The methods differ from each other (so the comparison above can fail).
            results[f"{model}/spread"] = float((references["gna"] - references["unpatched"]).abs().max())
    finally:
        if dist.get_rank() == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "cp.json").write_text(json.dumps(results, indent=2))
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    raise SystemExit(main())
