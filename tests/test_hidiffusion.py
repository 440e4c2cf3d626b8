"""HiDiffusion: window kernel vs reference, exact mode, RAU-Net schedule and sizes, odd sizes, errors, unpatch."""

import copy

import numpy as np
import pytest
import torch
from helpers import controlnet_pipeline, model_fingerprint

import accel
from accel.kernels.windows import quarter_shift, shifted_window_attention, shifted_window_attention_reference


@pytest.mark.parametrize(
    ("grid", "windows", "shift"),
    [
        ((8, 8), (2, 2), (0, 0)),
        ((8, 8), (2, 2), (2, 1)),
        ((7, 5), (2, 2), (3, 1)),
        ((9, 12), (3, 2), (1, 5)),
        ((5, 5), (1, 1), (2, 2)),
        ((1, 6), (1, 2), (0, 3)),
    ],
)
def test_window_kernel_matches_masked_reference(grid, windows, shift):
    q, k, v = (torch.randn(2, grid[0] * grid[1], 3, 16) for _ in range(3))
    ours = shifted_window_attention(q, k, v, grid, windows, shift)
    reference = shifted_window_attention_reference(q, k, v, grid, windows, shift)
    assert (ours - reference).abs().max() <= 1e-5


def _needs_triton():
    from accel.kernels.block_sparse import triton_usable

    if not triton_usable("cpu"):
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")


@pytest.mark.parametrize(
    ("grid", "windows", "shift"),
    [((8, 8), (2, 2), (0, 0)), ((8, 12), (2, 2), (3, 5)), ((6, 10), (3, 2), (1, 4)), ((16, 16), (1, 2), (0, 7))],
)
def test_windows_on_the_triton_kernel_match_the_torch_path(grid, windows, shift):
    _needs_triton()
    q, k, v = (torch.randn(2, grid[0] * grid[1], 2, 16) for _ in range(3))
    fused = shifted_window_attention(q, k, v, grid, windows, shift, backend="triton")
    reference = shifted_window_attention_reference(q, k, v, grid, windows, shift)
    assert (fused - reference).abs().max() <= 1e-5


def test_windows_on_the_triton_kernel_refuse_padded_grids():
    _needs_triton()
    q = torch.randn(1, 7 * 5, 1, 16)
    with pytest.raises(ValueError, match="backend='torch'"):
        shifted_window_attention(q, q, q, (7, 5), (2, 2), backend="triton")


def test_window_kernel_refuses_windows_that_do_not_fit():
    q = torch.randn(1, 6, 1, 8)
    with pytest.raises(ValueError, match="do not fit"):
        shifted_window_attention(q, q, q, (2, 3), (3, 3))


def generate(pipe, size, steps=3, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red circle",
        height=size[0],
        width=size[1],
        num_inference_steps=steps,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images


@pytest.fixture
def sd(tiny_pipelines):
    pipe = tiny_pipelines["sd15-tiny"]
    yield pipe
    accel.unpatch(pipe)


def test_exact_mode_equals_dense_and_unpatch_restores(sd):
    reference = generate(sd, (256, 256))
    before = model_fingerprint(sd.unet)
    handle = accel.patch(sd, "hidiffusion", raunet=False, windows=1)
    assert handle.layers
    assert np.abs(generate(sd, (256, 256)) - reference).max() <= 1e-5
    accel.patch(sd, "hidiffusion")  # the full method, with RAU-Net hooks on submodules
    changed = generate(sd, (256, 256))
    assert np.abs(changed - reference).max() > 1e-3
    accel.unpatch(sd)
    assert model_fingerprint(sd.unet) == before
    assert np.array_equal(generate(sd, (256, 256)), reference)


def deep_block_sizes(pipe, index, size, steps, **config):
    sizes = []
    handle = pipe.unet.down_blocks[index].register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(tuple(kwargs["hidden_states"].shape[-2:])), with_kwargs=True
    )
    try:
        with accel.patched(pipe, "hidiffusion", **config):
            generate(pipe, size, steps=steps, guidance_scale=7.5)
    finally:
        handle.remove()
    return sizes


def test_raunet_runs_deep_blocks_small_only_early_in_the_schedule(sd, caplog):
    # sd15-tiny trains at a 16x16 latent; 256 px gives 32x32, twice that: stage 1 until 0.4 of the schedule.
    with caplog.at_level("WARNING", logger="accel.pipelines.hidiffusion"):
        sizes = deep_block_sizes(sd, 1, (256, 256), steps=5)
    assert sizes == [(8, 8)] * 2 + [(16, 16)] * 3
    assert "RAU-Net is off" not in caplog.text
    # At the training size RAU-Net stays off unless a switch is given, and says so once.
    with caplog.at_level("WARNING", logger="accel.pipelines.hidiffusion"):
        assert deep_block_sizes(sd, 1, (128, 128), steps=2) == [(8, 8)] * 2
    assert caplog.text.count("RAU-Net is off for 16x16 latents") == 1
    assert deep_block_sizes(sd, 1, (128, 128), steps=2, raunet_switch=1.0) == [(4, 4)] * 2


def test_raunet_follows_the_schedule_under_img2img(sd, caplog):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    img2img.set_progress_bar_config(disable=True)
    sizes = []
    hook = sd.unet.down_blocks[1].register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(tuple(kwargs["hidden_states"].shape[-2:])), with_kwargs=True
    )

    def run(strength: float) -> list:
        sizes.clear()
        img2img(
            "a red circle",
            image=torch.rand(1, 3, 256, 256),
            strength=strength,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        return list(sizes)

    try:
        with accel.patched(sd, "hidiffusion"), caplog.at_level("WARNING", logger="accel.pipelines.hidiffusion"):
            # strength 0.8 of 5 steps starts at step 1 (progress 0.2): one RAU-Net step, then three full-size ones.
            assert run(0.8) == [(8, 8)] + [(16, 16)] * 3
            assert "past RAU-Net's last switch" not in caplog.text
            # strength 0.4 starts at progress 0.6, past the 0.4 switch: no RAU-Net step, and a notice, once.
            assert run(0.4) == [(16, 16)] * 2
            assert run(0.4) == [(16, 16)] * 2
    finally:
        hook.remove()
    assert (
        caplog.text.count(
            "enters the schedule at 0.60 (img2img / inpaint strength or denoising_start), past "
            "RAU-Net's last switch (0.40)"
        )
        == 1
    )


def test_a_run_handed_over_to_another_pipeline_is_placed_as_its_own(sd, caplog):
    # A refiner-style handover: the patched text-to-image call ends at progress 0.8, and a sibling img2img call
    # entering at 0.8 is a new generation (not the rest of the first one), past RAU-Net's switch.
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    img2img.set_progress_bar_config(disable=True)
    with accel.patched(sd, "hidiffusion"), caplog.at_level("WARNING", logger="accel.pipelines.hidiffusion"):
        generate(sd, (256, 256), steps=5)
        assert "enters the schedule" not in caplog.text
        img2img(
            "a red circle", image=torch.rand(1, 3, 256, 256), strength=0.2, num_inference_steps=5, output_type="np"
        )
    assert "enters the schedule at 0.80" in caplog.text


def test_inpaint_pipeline_is_patched_directly_and_follows_strength(sd):
    from diffusers import StableDiffusionInpaintPipeline

    inpaint = StableDiffusionInpaintPipeline(**sd.components)
    inpaint.set_progress_bar_config(disable=True)
    before = model_fingerprint(sd.unet)
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 64:192, 64:192] = 1.0
    sizes = []
    hook = sd.unet.down_blocks[1].register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(tuple(kwargs["hidden_states"].shape[-2:])), with_kwargs=True
    )
    try:
        with accel.patched(inpaint, "hidiffusion"):
            out = inpaint(
                "a red circle",
                image=torch.rand(1, 3, 256, 256),
                mask_image=mask,
                height=256,
                width=256,
                strength=0.8,
                num_inference_steps=5,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
    finally:
        hook.remove()
    assert np.isfinite(out).all() and out.shape == (1, 256, 256, 3)
    assert sizes == [(8, 8)] + [(16, 16)] * 3
    assert model_fingerprint(sd.unet) == before


def test_sdxl_shaped_unet_pools_in_level_one(tiny_pipelines):
    pipe = tiny_pipelines["sdxl-tiny"]
    sizes = []
    hook = (
        pipe.unet.down_blocks[1]
        .resnets[1]
        .register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    )
    try:
        with accel.patched(pipe, "hidiffusion"):
            out = generate(pipe, (256, 256), steps=5)
    finally:
        hook.remove()
        accel.unpatch(pipe)
    assert np.isfinite(out).all()
    assert sizes == [(8, 8)] * 2 + [(16, 16)] * 3


def test_triton_backend_in_the_pipeline_equals_torch(sd, caplog):
    _needs_triton()
    with accel.patched(sd, "hidiffusion", raunet=False, backend="torch"):
        tiled = generate(sd, (256, 256), steps=2)
    with accel.patched(sd, "hidiffusion", raunet=False, backend="triton") as handle:
        fused = generate(sd, (256, 256), steps=2)
        assert {p.backend for p in _window_processors(sd)} == {"triton"} and handle.layers
    assert np.abs(fused - tiled).max() <= 1e-4
    # 264 px: a 33x33 top grid, which 2x2 windows only cut with padding: SDPA serves it, and says so.
    with accel.patched(sd, "hidiffusion", raunet=False, backend="torch"):
        padded_tiled = generate(sd, (264, 264), steps=1)
    with accel.patched(sd, "hidiffusion", raunet=False, backend="triton"), caplog.at_level("WARNING"):
        padded_fused = generate(sd, (264, 264), steps=1)
    assert np.array_equal(padded_fused, padded_tiled)
    assert "run on SDPA instead of the Triton kernel" in caplog.text


def _window_processors(pipe):
    from accel.processors.hidiffusion import MSWMSAAttnProcessor

    return [p for p in pipe.unet.attn_processors.values() if isinstance(p, MSWMSAAttnProcessor)]


@pytest.mark.parametrize("size", [(1000, 1200), (1032, 776)])
def test_odd_sizes_run(sd, size):
    with accel.patched(sd, "hidiffusion"):
        out = generate(sd, size, steps=1, guidance_scale=1.0)
    assert out.shape == (1, *size, 3) and np.isfinite(out).all()


def test_windows_follow_a_non_square_grid_in_the_pipeline(sd, monkeypatch):
    # The window kernel is checked against its reference above; here, that the processor hands it the level's
    # grid the right way round (rows, cols) on a non-square image, with tokens in row-major order.
    import accel.processors.hidiffusion as window_module

    windowed, calls = window_module.quarter_shifted_window_attention, []

    def checked(query, key, value, grid, windows, quarter, backend):
        out = windowed(query, key, value, grid, windows, quarter, backend)
        shift = quarter_shift(grid, windows, int(quarter))
        reference = shifted_window_attention_reference(query, key, value, grid, windows, shift)
        calls.append((grid, windows, shift, (out - reference).abs().max().item()))
        return out

    monkeypatch.setattr(window_module, "quarter_shifted_window_attention", checked)
    height, width = 128, 192
    with accel.patched(sd, "hidiffusion", raunet=False, backend="torch"):
        generate(sd, (height, width), steps=2)
    top = (height // sd.vae_scale_factor, width // sd.vae_scale_factor)
    assert calls and {grid for grid, *_ in calls} == {top}
    assert all(windows == (2, 2) and error <= 1e-5 for _, windows, _, error in calls)
    assert any(shift[0] != shift[1] for _, _, shift, _ in calls)  # the shifts differ per axis with the window


def test_shifts_are_reproducible_and_leave_the_global_rng_alone(sd):
    accel.patch(sd, "hidiffusion")
    state = torch.random.get_rng_state()
    first = generate(sd, (256, 256))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert np.array_equal(generate(sd, (256, 256)), first)
    accel.patch(sd, "hidiffusion", shift_seed=1)
    assert not np.array_equal(generate(sd, (256, 256)), first)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"raunet_switch": -0.1}, "in [0, 1]"),
        ({"raunet_deep_switch": 2}, "in [0, 1]"),
        ({"windows": 0}, "positive int"),
        ({"raunet": False, "mswmsa": False}, "would do nothing"),
        ({"shift": "sometimes"}, "'random' or 'none'"),
        ({"mswmsa": False, "layers": ".*"}, "no effect"),
        ({"backend": "cuda"}, "auto, torch, triton"),
        ({"mswmsa": False, "backend": "torch"}, "no effect"),
    ],
)
def test_bad_configs_are_refused(sd, options, words):
    with pytest.raises(accel.InvalidOptionError, match=words.replace("[", r"\[").replace("]", r"\]")):
        accel.patch(sd, "hidiffusion", **options)


def test_window_larger_than_the_latent_is_a_clear_error(sd):
    with accel.patched(sd, "hidiffusion", window_size=64), pytest.raises(ValueError, match="larger than the"):
        generate(sd, (128, 128), steps=1)


def test_other_families_are_refused(tiny_pipelines):
    with pytest.raises(accel.UnsupportedModelError, match="supports Stable Diffusion 1.x / 2.x, SDXL pipelines"):
        accel.patch(tiny_pipelines["flux-tiny"], "hidiffusion")


def test_controlnet_residuals_follow_raunet(sd, monkeypatch):
    pipe = controlnet_pipeline(sd)
    control = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))

    def run(**call):
        return pipe(
            "a red circle",
            image=control,
            height=256,
            width=256,
            num_inference_steps=2,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **call,
        ).images

    reference = run()
    without_control = run(controlnet_conditioning_scale=0.0)
    assert np.abs(reference - without_control).max() > 1e-3  # the residuals change the image
    # RAU-Net switched off and one window: the residuals are added where diffusers adds them, bit for bit.
    with accel.patched(pipe, "hidiffusion", raunet_switch=0.0, windows=1):
        assert np.array_equal(run(), reference)
    import accel.pipelines.hidiffusion as raunet_module

    fitted, pooled = raunet_module._fitted, []

    def recording(residual, like):
        out = fitted(residual, like)
        if residual.shape[-2:] != like.shape[-2:]:
            pooled.append((out, torch.nn.functional.adaptive_avg_pool2d(residual, like.shape[-2:])))
        return out

    monkeypatch.setattr(raunet_module, "_fitted", recording)
    with accel.patched(pipe, "hidiffusion"):  # 2x the tiny UNet's size: RAU-Net shrinks the deep skips
        shrunk = run()
        state = pipe.unet._diffusers_hook.get_hook("accel_raunet").state
        assert state.down_residuals is None and state.mid_residual is None  # not kept alive past the call
        shrunk_without_control = run(controlnet_conditioning_scale=0.0)
    assert np.isfinite(shrunk).all() and np.abs(shrunk - shrunk_without_control).max() > 1e-3
    # While RAU-Net has the features shrunk, the residuals are pooled to them, not dropped.
    assert pooled and all(torch.equal(out, expected) for out, expected in pooled)
    assert any(out.abs().max() > 0 for out, _ in pooled)  # the run with control (the other has scale 0)


class _LoRAConv(torch.nn.Module):
    """peft's layout of a LoRA on a conv: the base layer, a down projection at the base's kernel and stride, a 1x1 up
    projection."""

    def __init__(self, base: torch.nn.Conv2d, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for weight in (self.lora_A.weight, self.lora_B.weight):
                weight.copy_(0.5 * torch.randn(weight.shape, generator=generator))

    def forward(self, hidden_states):
        return self.base_layer(hidden_states) + self.lora_B(self.lora_A(hidden_states))

    def merged(self) -> torch.nn.Conv2d:
        merged = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            merged.weight += torch.einsum("or,rikl->oikl", self.lora_B.weight[:, :, 0, 0], self.lora_A.weight)
        return merged


def test_raunet_strides_a_lora_on_the_down_sampler_with_its_base(sd):
    sampler = sd.unet.down_blocks[0].downsamplers[0]  # sd15's conv RAD
    own = sampler.conv
    lora = _LoRAConv(own)
    try:
        # RAU-Net runs at 256 px (twice the training size) for the first 2 of 5 steps.
        sampler.conv = lora.merged()
        with accel.patched(sd, "hidiffusion"):
            merged = generate(sd, (256, 256), steps=5)
        sampler.conv = lora
        with accel.patched(sd, "hidiffusion"):
            wrapped = generate(sd, (256, 256), steps=5)
        np.testing.assert_allclose(wrapped, merged, atol=1e-4)
        # A LoRA loaded after patching: refused with the fix, not a shape error deep in the up path.
        sampler.conv = own
        with accel.patched(sd, "hidiffusion"):
            sampler.conv = lora
            with pytest.raises(RuntimeError, match="changed after accel.patch .* patch again"):
                generate(sd, (256, 256), steps=5)
    finally:
        sampler.conv = own
