"""Seeded, offline diffusers pipelines with random weights, built from configs in memory.

Two families share one entry point, :func:`build_pipeline`:

* ``*-tiny``: small widths, real block structure and module names; they build in about a second and run a few
  denoising steps on a CPU, so tests and demos can exercise the real diffusers code paths.
* ``*-arch``: the real denoiser's widths, head counts and head dims (random weights) for timing. The text encoders
  and VAEs around them are deliberately small (one or two layers, narrow MLPs and VAE widths) but produce exactly the
  shapes the denoiser expects: the real hidden sizes, latent channels (SD 4, Flux 16, HunyuanVideo 16) and
  compression factors (spatial 8, temporal 4).

``num_blocks`` (arch only) trims the transformer depth so a model fits in memory:

* flux-arch, hunyuanvideo-arch: ``num_blocks`` double-stream blocks and ``2 * num_blocks`` single-stream blocks
  (the real models' 1:2 ratio, 19:38 and 20:40), each capped at the real count. HunyuanVideo keeps its 2 token
  refiner blocks. Default 2: Flux 1.31 B parameters (2.4 GiB in bf16), HunyuanVideo 1.61 B (3.0 GiB).
* sdxl-arch: caps every entry of ``transformer_layers_per_block`` (real ``(1, 2, 10)``). Default: the full UNet,
  2.57 B parameters (4.8 GiB in bf16).
* sd15-arch: the same cap, which changes nothing because SD-1.5 has one transformer layer per attention block.
"""

from __future__ import annotations

import difflib
import zlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

BUILTIN_NAMES: tuple[str, ...] = (
    "sd15-tiny",
    "sdxl-tiny",
    "flux-tiny",
    "hunyuanvideo-tiny",
    "sd15-arch",
    "sdxl-arch",
    "flux-arch",
    "hunyuanvideo-arch",
)

# Small sizes that run quickly on a CPU and satisfy each model's divisibility rules: SD-1.5 needs multiples of 64
# (8x VAE, 3 UNet downsamples), SDXL of 32, Flux of 16 (8x VAE, 2x2 packing), HunyuanVideo of 16 spatially and
# 4k + 1 frames. Benchmarks pass real resolutions themselves.
_GENERATION_KWARGS: dict[str, dict[str, int]] = {
    "sd15-tiny": {"height": 128, "width": 128},
    "sdxl-tiny": {"height": 128, "width": 128},
    "flux-tiny": {"height": 128, "width": 128, "max_sequence_length": 32},
    "hunyuanvideo-tiny": {"height": 128, "width": 128, "num_frames": 9, "max_sequence_length": 32},
    "sd15-arch": {"height": 128, "width": 128},
    "sdxl-arch": {"height": 128, "width": 128},
    "flux-arch": {"height": 128, "width": 128, "max_sequence_length": 64},
    "hunyuanvideo-arch": {"height": 64, "width": 64, "num_frames": 5, "max_sequence_length": 64},
}

_DEFAULT_NUM_BLOCKS: dict[str, int | None] = {
    "sd15-arch": None,
    "sdxl-arch": None,
    "flux-arch": 2,
    "hunyuanvideo-arch": 2,
}

# Denoiser configs of the released checkpoints (runwayml SD-1.5, SDXL base 1.0, FLUX.1-dev, HunyuanVideo).
_SD15_UNET: dict[str, Any] = {
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
    "transformer_layers_per_block": 1,
}
_SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "norm_num_groups": 32,
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
_HUNYUANVIDEO_TRANSFORMER: dict[str, Any] = {
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

# Words that become single tokens, so ordinary prompts tokenize into words; anything else falls back to
# characters (CLIP, T5) or bytes (Llama). The HunyuanVideo system prompt's words are included on purpose: see
# _llama_tokenizer.
_WORDS = """
a an the of in on at by for with and or to from into onto over under above below near behind beside between
through across along around inside outside front back top bottom left right up down is are was be being it its
this that these those his her their my your our one two three four five six seven eight nine ten many few some
no not very more most all each every other same new old young small big large tiny huge tall short long wide
round square flat thin thick high low full empty open closed bright dark light soft hard warm cold hot wet dry
clean dirty quiet loud fast slow beautiful pretty ugly cute happy sad angry calm wild strange simple complex
detailed highly realistic photorealistic cinematic dramatic epic vivid colorful pastel vintage modern ancient
futuristic fantasy magical mysterious golden silver wooden metal glass stone plastic paper red orange yellow
green blue purple pink brown black white gray grey cyan magenta teal violet beige color colors colour shape
shapes circle triangle rectangle sphere cube cone cylinder pyramid star heart line lines dot dots pattern
texture photo photograph picture image portrait painting drawing sketch illustration render rendering art
artwork style digital oil watercolor pencil anime cartoon comic poster concept studio lighting shot view close
closeup wide angle angles aerial macro bokeh depth field focus sharp blurry resolution quality masterpiece
trending film frame scene scenes video camera lens sunlight moonlight sunset sunrise night day morning evening
sky cloud clouds sun moon stars rain snow fog storm wind fire water ocean sea lake river beach island mountain
mountains hill forest tree trees flower flowers grass garden field desert city street road bridge building
house castle tower room kitchen window door table chair bed car bus train boat ship plane bicycle robot
computer phone book cup bottle ball hat dress shirt shoes glasses person people man woman boy girl child
children baby family friend king queen knight wizard astronaut soldier doctor chef artist dancer cat cats dog
dogs horse horses bird birds fish cow sheep pig lion tiger bear wolf fox rabbit mouse elephant giraffe monkey
panda owl eagle duck dragon unicorn dinosaur butterfly apple banana orange cake pizza bread coffee tea food
riding running walking flying swimming sitting standing jumping dancing playing eating drinking reading
holding wearing looking smiling sleeping painting floating falling burning glowing shining moving space planet
galaxy universe earth world nature landscape background foreground environment atmosphere mood weather
light lights shadow shadows reflection reflections surface object objects thing things part parts side
describe describes detailing following aspects aspect main content theme size quantity text spatial
relationship relationships action actions event events behavior behaviors temporal physical movement
movements change changes used transition transitions system user assistant
"""

_BYTE_LEVEL_EOW = "</w>"
_METASPACE = "\u2581"
_LLAMA_TEMPLATE_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def build_pipeline(
    name: str, *, dtype: torch.dtype | None = None, num_blocks: int | None = None, seed: int = 0
) -> DiffusionPipeline:
    """Build the named pipeline on CPU with seeded random weights, every module in eval mode.

    ``dtype`` defaults to float32 for ``*-tiny`` and bfloat16 for ``*-arch``. ``num_blocks`` trims an arch
    denoiser's depth (see the module docstring); it is an error for tiny pipelines. The same ``(name, num_blocks,
    seed)`` gives bit-identical weights.
    """
    import torch

    _check_name(name)
    tiny = name.endswith("-tiny")
    if num_blocks is not None:
        if tiny:
            raise ValueError(f"num_blocks applies to the *-arch pipelines only, not to {name!r}")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    elif not tiny:
        num_blocks = _DEFAULT_NUM_BLOCKS[name]
    if dtype is None:
        dtype = torch.float32 if tiny else torch.bfloat16
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

    family = name.rsplit("-", 1)[0]
    builders: dict[str, Callable[..., DiffusionPipeline]] = {
        "sd15": _build_sd15,
        "sdxl": _build_sdxl,
        "flux": _build_flux,
        "hunyuanvideo": _build_hunyuanvideo,
    }

    def make(role: str, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        # One seed per component, derived from its role, so adding or reordering components never shifts the
        # weights of the others; each one is cast right away so the float32 peak is one component, not all.
        # The CPU generator keeps only the low 32 bits of a seed, so the seed and role are hashed into 32 bits.
        torch.manual_seed(zlib.crc32(f"{role}/{seed}".encode()))
        module = factory()
        # nn.Module.to, not the diffusers override: that one warns about float32-only modules even when a model
        # has none, and a freshly built model has no offloading or quantization for it to handle.
        torch.nn.Module.to(module, dtype=dtype)
        return module.eval()

    # The caller's global RNG stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        pipe = builders[family](make, tiny=tiny, num_blocks=num_blocks)
    pipe.register_to_config(_name_or_path=f"accel/{name}")
    return pipe


def default_generation_kwargs(name: str) -> dict:
    """Small, valid size arguments for ``pipe(...)``: height/width, plus num_frames and max_sequence_length where
    the pipeline takes them."""
    _check_name(name)
    return dict(_GENERATION_KWARGS[name])


def _check_name(name: str) -> None:
    if name in BUILTIN_NAMES:
        return
    # cutoff=0 always yields a suggestion, however far off the name is.
    (guess,) = difflib.get_close_matches(str(name).lower(), BUILTIN_NAMES, n=1, cutoff=0.0)
    raise ValueError(f"unknown pipeline {name!r}; did you mean {guess!r}? Valid names: {', '.join(BUILTIN_NAMES)}")


def _capped(real: int, num_blocks: int | None, factor: int = 1) -> int:
    return real if num_blocks is None else min(real, factor * num_blocks)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers, built in memory


def _words() -> list[str]:
    return list(dict.fromkeys(_WORDS.split()))


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    # Lowest rank first, leftmost on ties, one pair at a time: the order the tokenizers BPE model uses.
    pieces = list(symbols)
    while len(pieces) > 1:
        pairs = [ranks.get((pieces[i], pieces[i + 1])) for i in range(len(pieces) - 1)]
        known = [(rank, i) for i, rank in enumerate(pairs) if rank is not None]
        if not known:
            break
        _, i = min(known)
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _learn_merges(words: Iterable[list[str]]) -> list[tuple[str, str]]:
    """Merges that turn every given symbol sequence into one token.

    A new merge always gets the highest rank, and a word that already collapses to one token only ever uses lower
    ranks, so adding merges for later words never splits an earlier one.
    """
    ranks: dict[tuple[str, str], int] = {}
    for symbols in words:
        pieces = _apply_merges(symbols, ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            pieces = _apply_merges(symbols, ranks)
    return list(ranks)


def _clip_tokenizer():
    return build_clip_tokenizer(_words(), model_max_length=77)


def build_clip_tokenizer(words: Iterable[str], model_max_length: int):
    """An in-memory byte-level CLIP tokenizer in which each of ``words`` is exactly one token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    # Every byte is a token both inside and at the end of a word, so any text encodes; the merges add whole words.
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [ch + _BYTE_LEVEL_EOW for ch in alphabet]
    merges = _learn_merges([*word[:-1], word[-1] + _BYTE_LEVEL_EOW] for word in words)
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    # Unigram picks the segmentation with the highest total score, so a known word (one piece) always beats its
    # characters; unknown characters become <unk>, as with the real sentencepiece model.
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, _METASPACE: -8.0}
    for word in _words():
        pieces[_METASPACE + word] = -5.0
        pieces[_METASPACE + word.capitalize()] = -5.5
    for code in range(33, 127):
        pieces.setdefault(chr(code), -10.0)
        pieces.setdefault(_METASPACE + chr(code), -9.0)
    return T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=512)


def _llama_tokenizer():
    """A byte-fallback BPE Llama tokenizer shaped after the Llama-3 one used by HunyuanVideo.

    It splits the HunyuanVideo system prompt where Llama-3 does (words with their leading space, single digits,
    punctuation, ``\\n\\n``), so the prompt prefix is 95 tokens including BOS and the pipeline's default
    ``crop_start=95`` cuts exactly the system prompt.
    """
    from transformers import LlamaTokenizer

    tokens = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += [_METASPACE, "\n"] + [chr(code) for code in range(33, 127)]
    units = [["\n", "\n"]]
    for word in _words():
        for form in (word, word.capitalize()):
            units += [list(form), [_METASPACE, *form]]
    merges = _learn_merges(units)
    tokens += [a + b for a, b in merges]
    tokens += list(_LLAMA_TEMPLATE_TOKENS)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        unk_token="<unk>",
        pad_token="<unk>",
        add_bos_token=True,
        add_prefix_space=False,
        # HunyuanVideo crops the system prompt from the front, which only works with right padding.
        padding_side="right",
        extra_special_tokens=list(_LLAMA_TEMPLATE_TOKENS),
        model_max_length=1024,
    )


# ---------------------------------------------------------------------------------------------------------------
# Text encoders


def _clip_text_model(
    tokenizer,
    *,
    hidden: int,
    heads: int,
    layers: int,
    ffn: int,
    projection: int | None = None,
    act: str = "quick_gelu",
):
    """CLIPTextModel, or CLIPTextModelWithProjection when ``projection`` is given (SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection or hidden,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection is not None else CLIPTextModel(config)


def _t5_encoder(tokenizer, *, d_model: int, d_kv: int, heads: int, layers: int, d_ff: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _llama_model(tokenizer, *, hidden: int, heads: int, kv_heads: int, layers: int, ffn: int):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaModel(config)


# ---------------------------------------------------------------------------------------------------------------
# VAEs


def _autoencoder_kl(*, tiny: bool, latent_channels: int, scaling_factor: float, flux: bool = False):
    from diffusers import AutoencoderKL

    # Four levels give the real 8x spatial factor; the widths are far below the real (128, 256, 512, 512).
    widths = (16, 16, 32, 32) if tiny else (32, 32, 64, 64)
    extra: dict[str, Any] = {}
    if flux:
        extra = {"shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=widths,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8 if tiny else 32,
        sample_size=64 if tiny else 512,
        scaling_factor=scaling_factor,
        **extra,
    )


# ---------------------------------------------------------------------------------------------------------------
# Pipelines


def _build_sd15(make, *, tiny: bool, num_blocks: int | None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer()
    if tiny:
        unet_config = {
            **_SD15_UNET,
            "sample_size": 16,  # so a call without height/width gets the default 128 px
            "block_out_channels": (32, 64, 128, 128),
            "attention_head_dim": 2,
            "cross_attention_dim": 32,
            "norm_num_groups": 8,
        }
        text = {"hidden": 32, "heads": 2, "layers": 2, "ffn": 64}
    else:
        unet_config = {**_SD15_UNET, "transformer_layers_per_block": _capped(1, num_blocks)}
        text = {"hidden": 768, "heads": 12, "layers": 1, "ffn": 256}
    return StableDiffusionPipeline(
        vae=make("vae", lambda: _autoencoder_kl(tiny=tiny, latent_channels=4, scaling_factor=0.18215)),
        text_encoder=make("text_encoder", lambda: _clip_text_model(tokenizer, **text)),
        tokenizer=tokenizer,
        unet=make("unet", lambda: UNet2DConditionModel(**unet_config)),
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(make, *, tiny: bool, num_blocks: int | None):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer()
    if tiny:
        text_1 = {"hidden": 32, "heads": 2, "layers": 2, "ffn": 64}
        text_2 = {"hidden": 32, "heads": 2, "layers": 2, "ffn": 64, "projection": 32, "act": "gelu"}
        unet_config = {
            **_SDXL_UNET,
            "sample_size": 16,  # so a call without height/width gets the default 128 px
            "block_out_channels": (32, 64, 128),
            # Head dim 16 everywhere, as the real model keeps 64.
            "attention_head_dim": (2, 4, 8),
            "norm_num_groups": 8,
            "addition_time_embed_dim": 8,
        }
    else:
        # CLIP ViT-L (768) and OpenCLIP bigG (1280, projection 1280) widths, one layer each.
        text_1 = {"hidden": 768, "heads": 12, "layers": 1, "ffn": 256}
        text_2 = {"hidden": 1280, "heads": 20, "layers": 1, "ffn": 256, "projection": 1280, "act": "gelu"}
        layers = tuple(_capped(n, num_blocks) for n in _SDXL_UNET["transformer_layers_per_block"])
        unet_config = {**_SDXL_UNET, "transformer_layers_per_block": layers}
    # The UNet attends to both encoders' hidden states side by side and embeds the pooled projection next to the
    # six micro-conditioning numbers (sizes and crop).
    unet_config["cross_attention_dim"] = text_1["hidden"] + text_2["hidden"]
    unet_config["projection_class_embeddings_input_dim"] = (
        6 * unet_config["addition_time_embed_dim"] + text_2["projection"]
    )
    return StableDiffusionXLPipeline(
        vae=make("vae", lambda: _autoencoder_kl(tiny=tiny, latent_channels=4, scaling_factor=0.13025)),
        text_encoder=make("text_encoder", lambda: _clip_text_model(tokenizer, **text_1)),
        text_encoder_2=make("text_encoder_2", lambda: _clip_text_model(tokenizer, **text_2)),
        tokenizer=tokenizer,
        tokenizer_2=_clip_tokenizer(),
        unet=make("unet", lambda: UNet2DConditionModel(**unet_config)),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            timestep_spacing="leading",
        ),
        add_watermarker=False,
    )


def _build_flux(make, *, tiny: bool, num_blocks: int | None):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()
    if tiny:
        latent_channels = 4
        clip = {"hidden": 32, "heads": 2, "layers": 2, "ffn": 64}
        t5 = {"d_model": 32, "d_kv": 8, "heads": 4, "layers": 2, "d_ff": 37}
        transformer_config = {
            **_FLUX_TRANSFORMER,
            "in_channels": 4 * latent_channels,
            "num_layers": 2,
            "num_single_layers": 4,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": (4, 6, 6),
        }
    else:
        latent_channels = 16
        # CLIP ViT-L pooled output (768) and T5-XXL hidden states (4096, 64 heads of 64), one layer each.
        clip = {"hidden": 768, "heads": 12, "layers": 1, "ffn": 256}
        t5 = {"d_model": 4096, "d_kv": 64, "heads": 64, "layers": 1, "d_ff": 256}
        transformer_config = {
            **_FLUX_TRANSFORMER,
            "num_layers": _capped(_FLUX_TRANSFORMER["num_layers"], num_blocks),
            "num_single_layers": _capped(_FLUX_TRANSFORMER["num_single_layers"], num_blocks, factor=2),
        }
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=make(
            "vae",
            lambda: _autoencoder_kl(tiny=tiny, latent_channels=latent_channels, scaling_factor=0.3611, flux=True),
        ),
        text_encoder=make("text_encoder", lambda: _clip_text_model(clip_tokenizer, **clip)),
        tokenizer=clip_tokenizer,
        text_encoder_2=make("text_encoder_2", lambda: _t5_encoder(t5_tokenizer, **t5)),
        tokenizer_2=t5_tokenizer,
        transformer=make("transformer", lambda: FluxTransformer2DModel(**transformer_config)),
    )


def _build_hunyuanvideo(make, *, tiny: bool, num_blocks: int | None):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    llama_tokenizer = _llama_tokenizer()
    clip_tokenizer = _clip_tokenizer()
    if tiny:
        latent_channels = 4
        # The pipeline takes hidden_states[-3], so three layers make that a real layer's output.
        llama = {"hidden": 32, "heads": 4, "kv_heads": 2, "layers": 3, "ffn": 64}
        clip = {"hidden": 32, "heads": 2, "layers": 2, "ffn": 64}
        vae_widths, vae_groups = (8, 8, 8, 8), 4
        transformer_config = {
            **_HUNYUANVIDEO_TRANSFORMER,
            "in_channels": latent_channels,
            "out_channels": latent_channels,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "num_layers": 2,
            "num_single_layers": 4,
            "text_embed_dim": 32,
            "pooled_projection_dim": 32,
            "rope_axes_dim": (4, 6, 6),
        }
    else:
        latent_channels = 16
        # Llama-3-8B hidden size and heads (4096, 32 heads, 8 KV heads) and CLIP ViT-L pooled output (768). Two
        # Llama layers because the pipeline reads hidden_states[-3].
        llama = {"hidden": 4096, "heads": 32, "kv_heads": 8, "layers": 2, "ffn": 256}
        clip = {"hidden": 768, "heads": 12, "layers": 1, "ffn": 256}
        vae_widths, vae_groups = (32, 32, 64, 64), 32
        transformer_config = {
            **_HUNYUANVIDEO_TRANSFORMER,
            "num_layers": _capped(_HUNYUANVIDEO_TRANSFORMER["num_layers"], num_blocks),
            "num_single_layers": _capped(_HUNYUANVIDEO_TRANSFORMER["num_single_layers"], num_blocks, factor=2),
        }
    return HunyuanVideoPipeline(
        text_encoder=make("text_encoder", lambda: _llama_model(llama_tokenizer, **llama)),
        tokenizer=llama_tokenizer,
        transformer=make("transformer", lambda: HunyuanVideoTransformer3DModel(**transformer_config)),
        vae=make(
            "vae",
            lambda: AutoencoderKLHunyuanVideo(
                in_channels=3,
                out_channels=3,
                latent_channels=latent_channels,
                down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                up_block_types=("HunyuanVideoUpBlock3D",) * 4,
                block_out_channels=vae_widths,
                layers_per_block=1,
                norm_num_groups=vae_groups,
                spatial_compression_ratio=8,
                temporal_compression_ratio=4,
            ),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=make("text_encoder_2", lambda: _clip_text_model(clip_tokenizer, **clip)),
        tokenizer_2=clip_tokenizer,
    )
