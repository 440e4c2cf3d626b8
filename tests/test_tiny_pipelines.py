"""Offline tiny and arch pipelines: they build, generate deterministically and mirror the real models' structure."""

import re

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights

from accel.pipelines import tiny

torch.set_num_threads(2)

TINY_NAMES = [name for name in tiny.BUILTIN_NAMES if name.endswith("-tiny")]
ARCH_NAMES = [name for name in tiny.BUILTIN_NAMES if name.endswith("-arch")]
PROMPT = "a photo of an astronaut riding a horse on the moon"

# Written out here rather than imported, so a typo in pipelines/tiny.py cannot hide itself.
REAL_SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
REAL_SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
REAL_FLUX = {
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
    "patch_size": 1,
}
REAL_HUNYUANVIDEO = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "num_layers": 20,
    "num_single_layers": 40,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": 4096,
    "pooled_projection_dim": 768,
    "rope_theta": 256.0,
    "rope_axes_dim": (16, 56, 56),
}


def _real_denoiser(family: str):
    from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel, UNet2DConditionModel

    with init_empty_weights():
        if family == "sd15":
            return UNet2DConditionModel(**REAL_SD15_UNET)
        if family == "sdxl":
            return UNet2DConditionModel(**REAL_SDXL_UNET)
        if family == "flux":
            return FluxTransformer2DModel(**REAL_FLUX)
        return HunyuanVideoTransformer3DModel(**REAL_HUNYUANVIDEO)


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {key: value for key, value in pipe.components.items() if isinstance(value, torch.nn.Module)}


def _generate(pipe, name: str, steps: int = 2):
    kwargs = tiny.default_generation_kwargs(name)
    out = pipe(
        PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
    )
    return out.frames if hasattr(out, "frames") else out.images


def _index_free(names) -> set[str]:
    return {re.sub(r"\.\d+(?=\.|$)", ".N", name) for name in names}


@pytest.fixture(scope="module")
def tiny_pipe():
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny.build_pipeline(name)
            cache[name].set_progress_bar_config(disable=True)
        return cache[name]

    return get


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_pipeline_generates_deterministically(tiny_pipe, name):
    pipe = tiny_pipe(name)
    assert pipe.name_or_path == f"accel/{name}"
    for module in _modules(pipe).values():
        assert not any(m.training for m in module.modules())
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters())

    first = _generate(pipe, name)
    second = _generate(pipe, name)
    kwargs = tiny.default_generation_kwargs(name)
    expected = (1, kwargs["height"], kwargs["width"], 3)
    if "num_frames" in kwargs:
        expected = (1, kwargs["num_frames"], *expected[1:])
    assert first.shape == expected
    assert np.isfinite(first).all()
    assert first.std() > 0
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_same_seed_same_weights(tiny_pipe, name):
    again = tiny.build_pipeline(name)
    other_seed = tiny.build_pipeline(name, seed=1)
    built = _modules(tiny_pipe(name))
    assert built.keys() == _modules(again).keys()
    for role, module in built.items():
        state, state_again = module.state_dict(), _modules(again)[role].state_dict()
        assert state.keys() == state_again.keys()
        for key, value in state.items():
            assert torch.equal(value, state_again[key]), f"{role}.{key}"
    weight = next(iter(_denoiser(tiny_pipe(name)).parameters()))
    assert not torch.equal(weight, next(iter(_denoiser(other_seed).parameters())))


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny.build_pipeline("flux-tiny")
    assert torch.equal(torch.rand(4), expected)


def test_tiny_bfloat16(tiny_pipe):
    pipe = tiny.build_pipeline("sd15-tiny", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    for module in _modules(pipe).values():
        assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    image = _generate(pipe, "sd15-tiny", steps=1)
    assert np.isfinite(image).all()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_unet_names_match_real(tiny_pipe, family):
    unet = tiny_pipe(f"{family}-tiny").unet
    real = _real_denoiser(family)
    assert unet.attn_processors.keys() == real.attn_processors.keys()
    assert unet.state_dict().keys() == real.state_dict().keys()
    names = dict(unet.named_modules())
    if family == "sd15":
        for name in (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
            "down_blocks.2.resnets.0.conv_shortcut",
            "mid_block.attentions.0.transformer_blocks.0.attn2",
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2",
        ):
            assert name in names
        assert "down_blocks.3.resnets.0.conv_shortcut" not in names
    else:
        assert "down_blocks.2.attentions.1.transformer_blocks.9.attn1" in names
        assert "down_blocks.0.attentions" not in names


@pytest.mark.parametrize(
    ("family", "patterns"),
    [
        ("flux", [r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"]),
        (
            "hunyuanvideo",
            [
                r"transformer_blocks\.\d+\.attn",
                r"single_transformer_blocks\.\d+\.attn",
                r"context_embedder\.token_refiner\.refiner_blocks\.\d+\.attn",
            ],
        ),
    ],
)
def test_tiny_transformer_names_match_real(tiny_pipe, family, patterns):
    transformer = tiny_pipe(f"{family}-tiny").transformer
    keys = list(transformer.attn_processors)
    for key in keys:
        assert any(re.fullmatch(pattern + r"\.processor", key) for pattern in patterns), key
    for pattern in patterns:
        assert any(re.fullmatch(pattern + r"\.processor", key) for key in keys), pattern
    real = _real_denoiser(family)
    assert _index_free(keys) == _index_free(real.attn_processors)
    assert _index_free(n for n, _ in transformer.named_modules()) == _index_free(n for n, _ in real.named_modules())


def test_tiny_tokenizers_keep_words_whole(tiny_pipe):
    flux, video = tiny_pipe("flux-tiny"), tiny_pipe("hunyuanvideo-tiny")
    words = PROMPT.split() + ["red", "cube", "cinematic", "dragon"]
    for word in words:
        assert len(flux.tokenizer.tokenize(word)) == 1, word
        assert len(flux.tokenizer_2.tokenize(word)) == 1, word
        assert len(video.tokenizer.tokenize(" " + word)) == 1, word
    # Unknown words still tokenize (characters or bytes), never to nothing.
    assert len(flux.tokenizer.tokenize("zqx")) == 3
    assert video.tokenizer.decode(video.tokenizer("zqx é").input_ids, skip_special_tokens=True) == "zqx é"


def test_hunyuanvideo_template_crop_start(tiny_pipe):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    tokenizer = tiny_pipe("hunyuanvideo-tiny").tokenizer
    ids = tokenizer(DEFAULT_PROMPT_TEMPLATE["template"].format(PROMPT)).input_ids
    crop = DEFAULT_PROMPT_TEMPLATE["crop_start"]
    # The crop ends right after the user header, so what is left is the prompt and the closing <|eot_id|>.
    assert tokenizer.convert_ids_to_tokens(ids[crop - 2 : crop]) == ["<|end_header_id|>", "\n\n"]
    assert tokenizer.decode(ids[crop:-1]) == PROMPT
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|eot_id|>"
    padded = tokenizer([PROMPT], max_length=crop + 32, padding="max_length")
    assert padded.attention_mask[0][0] == 1 and padded.attention_mask[0][-1] == 0


def _arch(name: str, **kwargs):
    # Never materialise the real widths in a test: parameters live on the meta device.
    with init_empty_weights():
        return tiny.build_pipeline(name, **kwargs)


def test_sd15_arch_matches_real():
    pipe = _arch("sd15-arch")
    unet = pipe.unet
    assert unet.device.type == "meta" and unet.dtype == torch.bfloat16
    assert unet.state_dict().keys() == _real_denoiser("sd15").state_dict().keys()
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            width = module.to_q.out_features
            assert module.heads == 8 and width // module.heads == {320: 40, 640: 80, 1280: 160}[width]
        if name.endswith(".attn2"):
            assert module.to_k.in_features == 768
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert pipe.text_encoder.config.hidden_size == 768
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 8


@pytest.mark.parametrize(("num_blocks", "depths"), [(None, (2, 10)), (1, (1, 1)), (3, (2, 3))])
def test_sdxl_arch_matches_real(num_blocks, depths):
    pipe = _arch("sdxl-arch", num_blocks=num_blocks)
    unet = pipe.unet
    if num_blocks is None:
        assert unet.state_dict().keys() == _real_denoiser("sdxl").state_dict().keys()
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            assert module.to_q.out_features // module.heads == 64
        if name.endswith(".attn2"):
            assert module.to_k.in_features == 2048
    assert [unet.down_blocks[i].attentions[0].transformer_blocks[0].attn1.heads for i in (1, 2)] == [10, 20]
    assert tuple(len(unet.down_blocks[i].attentions[0].transformer_blocks) for i in (1, 2)) == depths
    assert len(unet.mid_block.attentions[0].transformer_blocks) == depths[1]
    assert unet.add_embedding.linear_1.in_features == 2816
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280)
    assert pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size == 2048
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 8


@pytest.mark.parametrize(("num_blocks", "double", "single"), [(None, 2, 4), (1, 1, 2), (100, 19, 38)])
def test_flux_arch_matches_real(num_blocks, double, single):
    pipe = _arch("flux-arch", num_blocks=num_blocks)
    transformer = pipe.transformer
    config = {key: transformer.config[key] for key in REAL_FLUX}
    config["axes_dims_rope"] = tuple(config["axes_dims_rope"])
    assert config == {**REAL_FLUX, "num_layers": double, "num_single_layers": single}
    assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (double, single)
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        assert block.attn.heads == 24 and block.attn.to_q.weight.shape == (3072, 3072)
    assert transformer.context_embedder.in_features == 4096
    assert transformer.x_embedder.in_features == 64
    assert pipe.text_encoder_2.config.d_model == 4096
    assert pipe.text_encoder.config.hidden_size == 768
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    if num_blocks is None:
        assert 2 * sum(p.numel() for p in transformer.parameters()) <= 3 * 2**30


@pytest.mark.parametrize(("num_blocks", "double", "single"), [(None, 2, 4), (1, 1, 2), (100, 20, 40)])
def test_hunyuanvideo_arch_matches_real(num_blocks, double, single):
    pipe = _arch("hunyuanvideo-arch", num_blocks=num_blocks)
    transformer = pipe.transformer
    config = {key: transformer.config[key] for key in REAL_HUNYUANVIDEO}
    config["rope_axes_dim"] = tuple(config["rope_axes_dim"])
    assert config == {**REAL_HUNYUANVIDEO, "num_layers": double, "num_single_layers": single}
    assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (double, single)
    refiners = transformer.context_embedder.token_refiner.refiner_blocks
    assert len(refiners) == 2
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks, *refiners]:
        assert block.attn.heads == 24 and block.attn.to_q.weight.shape == (3072, 3072)
    assert transformer.context_embedder.proj_in.in_features == 4096
    assert pipe.text_encoder.config.hidden_size == 4096
    assert pipe.text_encoder_2.config.hidden_size == 768
    assert pipe.vae.config.latent_channels == 16
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (8, 4)
    if num_blocks is None:
        assert 2 * sum(p.numel() for p in transformer.parameters()) <= 3 * 2**30


def test_default_generation_kwargs_are_valid_copies():
    for name in tiny.BUILTIN_NAMES:
        kwargs = tiny.default_generation_kwargs(name)
        assert kwargs["height"] % 16 == 0 and kwargs["width"] % 16 == 0
        if "num_frames" in kwargs:
            assert kwargs["num_frames"] % 4 == 1
        kwargs["height"] = 1
        assert tiny.default_generation_kwargs(name)["height"] != 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="sd15-tiny") as info:
        tiny.build_pipeline("sd15tiny")
    assert all(name in str(info.value) for name in tiny.BUILTIN_NAMES)
    with pytest.raises(ValueError, match="hunyuanvideo-arch"):
        tiny.default_generation_kwargs("hunyuan-video-arch")
    with pytest.raises(ValueError, match="num_blocks"):
        tiny.build_pipeline("flux-tiny", num_blocks=2)
    with pytest.raises(ValueError, match="num_blocks"):
        tiny.build_pipeline("flux-arch", num_blocks=0)
