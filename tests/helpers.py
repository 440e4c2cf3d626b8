"""Helpers shared by the tests (pytest puts tests/ on sys.path)."""

import torch


def generate(pipe, name: str, steps: int = 2, seed: int = 0, **overrides):
    """Seeded generation at the tiny pipeline's default size; returns a float32 numpy array."""
    from accel.pipelines import tiny

    kwargs = {**tiny.default_generation_kwargs(name), "num_inference_steps": steps, **overrides}
    kwargs.setdefault("prompt", "a red circle and a blue square")
    result = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return result.frames if hasattr(result, "frames") else result.images


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Everything `unpatch` must restore: processor identity, module classes, hook and forward attributes."""
    return {
        "processors": {k: id(v) for k, v in model.attn_processors.items()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "hooks": [n for n, m in model.named_modules() if hasattr(m, "_diffusers_hook")],
        "forward_attributes": [n for n, m in model.named_modules() if "forward" in vars(m)],
        "attributes": sorted(vars(model)),
    }
