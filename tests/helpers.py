"""Helpers shared by the tests (pytest puts tests/ on sys.path)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import PeakMemory  # noqa: E402, F401  (shared with the benchmarks that report memory)


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


def generate_shapes(pipe, prompt, steps: int = 4, size: int = 64, **overrides):
    """``shapes-sd`` (or another SD pipeline) at its quality settings: guidance 6, seed 0, numpy output."""
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=6.0,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **overrides,
    ).images


def losses_over_latent_updates(record_maps, concept_maps, latent, loss_name: str, updates: int = 4) -> list[float]:
    """The controls' loss over ``updates`` gradient steps on ``latent`` (``record_maps(latent)`` runs the model and
    returns its aggregated maps; ``concept_maps(maps)`` picks the subjects)."""
    from accel.kernels import controls

    losses = []
    for _ in range(updates):
        latent = latent.detach().requires_grad_()
        concepts = concept_maps(record_maps(latent))
        if loss_name == "segregation":
            loss = controls.segregation_loss(controls.segregation_maps(concepts)).sum()
        else:
            loss = controls.attend_excite_loss(concepts).sum()
        (gradient,) = torch.autograd.grad(loss, latent)
        losses.append(loss.item())
        latent = latent - 20.0 * gradient
    return losses


def controlnet_pipeline(sd):
    """An SD ControlNet pipeline on ``sd``'s components whose ControlNet matters: a fresh one's zero convolutions
    output zeros, so they get small random weights (seeded)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(sd.unet).eval()
    with torch.no_grad():
        for block in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            block.weight.normal_(0, 0.05)
    pipe = StableDiffusionControlNetPipeline(**sd.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def backward_in_another_thread(monkeypatch) -> None:
    """Make ``torch.autograd.grad`` run in a thread of its own, as torch runs a GPU backward pass (and gradient
    checkpointing's recomputation) in device threads; on a CPU it runs in the calling thread."""
    import threading

    grad = torch.autograd.grad

    def in_another_thread(*args, **kwargs):
        result = {}

        def run():
            try:
                result["gradients"] = grad(*args, **kwargs)
            except BaseException as error:  # noqa: BLE001  (raised again in the caller's thread)
                result["error"] = error

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        if "error" in result:
            raise result["error"]
        return result["gradients"]

    monkeypatch.setattr(torch.autograd, "grad", in_another_thread)
