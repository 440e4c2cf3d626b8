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


class PeakMemory:
    """Peak bytes of the tensors that torch ops allocate inside the ``with`` block (inputs excluded).

    A dispatch mode sees every op's outputs; a storage counts from its first appearance until it is freed. Buffers
    that a fused kernel keeps internally are not seen, but anything Python-level code materialises is.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out)
                return out

        self._mode = _Mode()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def _record(self, out) -> None:
        import weakref

        from torch.utils._pytree import tree_leaves

        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor):
                continue
            storage = leaf.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self._live:
                self._live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


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
