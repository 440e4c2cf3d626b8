"""Editing a real image with Stable Diffusion (1.x / 2.x): DDIM inversion, null-text inversion, Dynamic Prompt
Learning, and Prompt-to-Prompt's attention injection with local blending.

The steps, for an image and a source prompt that describes it:

1. The image is encoded and inverted with DDIM under the source prompt alone (no guidance), giving the latents
   ``z*_0 (noisiest) … z*_n (the image)``.
2. Walking the schedule forward from ``z*_0``, each step's unconditional embedding is optimised so that the guided
   DDIM step lands on the inverted latent of the next step (null-text inversion): the source branch then
   reconstructs the image under guidance.
3. Dynamic Prompt Learning (``method="dpl"``) first learns, at each step, new embeddings for the prompt's nouns that
   pull their cross-attention maps onto their own objects (Attend-and-Excite's balance loss), apart from each other
   (cosine similarity of the maps) and off the background (cosine similarity with a background mask found by
   clustering the self-attention of the inversion); null-text inversion then runs with those embeddings.
4. Source and edit are denoised together from ``z*_0``: the edit row's cross-attention takes the source row's maps
   through the two prompts' word alignment for the first ``cross_replace`` of the schedule, its coarse
   self-attention the source's for the first ``self_replace``, and after ``blend_start`` the edit's latent outside the
   edited words' attention region is reset to the source's (local blend). With DPL the nouns' learned embeddings are
   used by both prompts, so their maps, and the blend region, stay on their objects.

All of it runs in fp32 with gradients only where an optimisation needs them; the pipeline's processors are restored
when the edit ends, also on error.
"""

from __future__ import annotations

import difflib
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging

from accel.errors import InvalidOptionError, UnsupportedModelError
from accel.kernels import controls, editing
from accel.pipelines.families import UNetFamily
from accel.pipelines.prompts import PromptWord, noun_phrases, prompt_words
from accel.processors.editing import EditAttnProcessor, EditController
from accel.processors.state import LatentLayout

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class PromptAlignment:
    """How the edit prompt's tokens relate to the source prompt's.

    Attributes:
        mapper: ``[T, T]``; column ``j`` averages the source tokens aligned with target token ``j``.
        keep_source: ``[T]``; 1 where target token ``j`` takes the source's attention, 0 for words the edit adds.
        changed: ``(source word index or None, target word index or None)`` for each word the edit swaps, adds or
            drops.
        matched: target word index -> source word index, for the words both prompts share.
    """

    mapper: torch.Tensor
    keep_source: torch.Tensor
    changed: tuple[tuple[int | None, int | None], ...]
    matched: dict[int, int]


def align_prompts(tokenizer, source: str, target: str) -> PromptAlignment:
    """Word-level alignment of two prompts (longest matching blocks); equal-length differing runs are word swaps,
    other differences are additions / removals. Works for words of several tokens and for prompts of different
    lengths (Prompt-to-Prompt needs separate code paths for the two)."""
    length = tokenizer.model_max_length
    source_words, target_words = prompt_words(tokenizer, source), prompt_words(tokenizer, target)
    mapper, keep = torch.zeros(length, length), torch.zeros(length)
    first = min((w.tokens[0] for w in source_words), default=1)
    for position in range(min(first, min((w.tokens[0] for w in target_words), default=1))):
        mapper[position, position], keep[position] = 1.0, 1.0  # BOS

    def pair(source_word: PromptWord, target_word: PromptWord) -> None:
        for column in target_word.tokens:
            mapper[list(source_word.tokens), column] = 1.0 / len(source_word.tokens)
            keep[column] = 1.0

    matcher = difflib.SequenceMatcher(
        a=[_key(w.text) for w in source_words], b=[_key(w.text) for w in target_words], autojunk=False
    )
    changed: list[tuple[int | None, int | None]] = []
    matched: dict[int, int] = {}
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
            for s, t in zip(range(i1, i2), range(j1, j2), strict=True):
                pair(source_words[s], target_words[t])
                if tag == "replace":
                    changed.append((s, t))
                else:
                    matched[t] = s
        else:
            changed += [(s, None) for s in range(i1, i2)] + [(None, t) for t in range(j1, j2)]
    # EOS and padding: the k-th token after the target's words takes the k-th after the source's.
    source_end = max((w.tokens[-1] for w in source_words), default=0) + 1
    target_end = max((w.tokens[-1] for w in target_words), default=0) + 1
    for column in range(target_end, length):
        mapper[min(source_end + column - target_end, length - 1), column] = 1.0
        keep[column] = 1.0
    return PromptAlignment(mapper, keep, tuple(changed), matched)


def _key(word: str) -> str:
    return word.strip(".,;:!?\"'()").lower()


def _phrase_heads(prompt: str, words: list[PromptWord]) -> dict[int, int]:
    """Word index -> index of the last word of its noun phrase, for the words inside one (of those that fit)."""
    heads = {}
    for phrase in noun_phrases(prompt):
        for index in range(phrase.words[0], min(phrase.words[1], len(words))):
            heads[index] = min(phrase.words[1], len(words)) - 1
    return heads


def _runs(indices: list[int]) -> list[list[int]]:
    """Sorted word indices split into runs of consecutive ones."""
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


@dataclass
class EditResult:
    """What ``accel.edit`` returns.

    Attributes:
        image: the edited image (PIL).
        reconstruction: the source branch of the same run: the input image as the inverted model redraws it.
        blend_mask: ``[h, w]`` (latent grid) region where the edit was allowed to change the image at the last step,
            or ``None`` without local blending.
        background: DPL's background mask ``[h, w]`` on the map grid, or ``None`` (P2P).
        blend_words / dynamic_words: the words whose maps drove the blend, and the nouns DPL learned.
        losses: per step: ``null_text`` (the inversion's final latent error), and for DPL ``dpl_first`` /
            ``dpl_last`` (the learning loss before and after the step's updates).
        seconds: wall time of ``inversion``, ``learning`` (null-text and DPL) and ``edit``.
    """

    image: Any
    reconstruction: Any
    blend_mask: np.ndarray | None
    background: np.ndarray | None
    blend_words: list[str]
    dynamic_words: list[str]
    losses: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def check_pipeline(pipe) -> None:
    from diffusers import UNet2DConditionModel

    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer") if getattr(pipe, name, None) is None]
    if missing or not isinstance(pipe.unet, UNet2DConditionModel):
        raise UnsupportedModelError(
            f"accel.edit: a Stable Diffusion 1.x / 2.x pipeline is needed (unet, vae, text_encoder, tokenizer); "
            f"{type(pipe).__name__} has {'no ' + ', '.join(missing) if missing else 'no UNet2DConditionModel'}"
        )
    if pipe.unet.config.addition_embed_type is not None or getattr(pipe, "text_encoder_2", None) is not None:
        raise UnsupportedModelError(
            "accel.edit: SDXL-style UNets (added text / time embeddings, two text encoders) are not supported yet; "
            "use a Stable Diffusion 1.x / 2.x pipeline"
        )
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise UnsupportedModelError(
            f"accel.edit: the scheduler's prediction_type={prediction!r}; epsilon and v_prediction are supported"
        )


# What ``accel.edit`` takes as its image, for the errors that refuse anything else.
_ACCEPTED_IMAGES = (
    "one image: a PIL image (any 8-bit mode; alpha is dropped), a uint8 numpy array HxWx3 (HxW grey and HxWx4 RGBA "
    "too), a float numpy array HxWx3 (or 1xHxWx3) in [0, 1], or a float tensor 3xHxW (or 1x3xHxW) in [0, 1]"
)
# Float images may overshoot [0, 1] by this much (resampling, colour conversion); they are clipped to it.
_RANGE_SLACK = 1e-3


def _rgb_image(image):
    """``image`` as one RGB image in a form the pipeline's image processor reads right.

    PIL images of any 8-bit mode are converted to RGB (alpha dropped), 16-bit grey ones ("I;16") scaled to [0, 1];
    numpy arrays are channels-last (HxW grey, HxWx1, HxWx2 grey + alpha, HxWx3, HxWx4 RGBA, optionally with a
    leading batch of 1): uint8 in 0..255 or float in [0, 1]; tensors are channels-first float in [0, 1] (3xHxW or
    1x3xHxW). A list or tuple of one image is that image. Anything else raises `InvalidOptionError` naming what is
    accepted, instead of the channel, shape or interpolation errors the processor and the VAE would give (or, for
    a float image in 0..255, a silently wrong latent).
    """
    from PIL import Image

    if isinstance(image, list | tuple):
        if len(image) != 1:
            raise InvalidOptionError(
                f"accel.edit: edits one image at a time; got a {type(image).__name__} of {len(image)} images: pass "
                + _ACCEPTED_IMAGES
            )
        image = image[0]
    if isinstance(image, Image.Image):
        if image.mode.startswith("I;16"):
            # convert("RGB") clips 16-bit values at 255 (a nearly white image); their range is known, so scale it.
            return _rgb_array(np.asarray(image, dtype=np.float32) / 65535)
        if image.mode in ("I", "F"):
            raise InvalidOptionError(
                f"accel.edit: a PIL image of mode {image.mode!r} (32-bit, range unknown) would be clipped to 8 bits; "
                "scale it to [0, 1] yourself and pass a float numpy array "
                "(np.asarray(image, dtype=np.float32) / its maximum), or pass " + _ACCEPTED_IMAGES
            )
        # The VAE takes 3 channels, and the image processor (do_convert_rgb=False) passes L, P or RGBA unchanged.
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        return _rgb_array(image)
    if isinstance(image, torch.Tensor):
        return _rgb_tensor(image)
    raise InvalidOptionError(f"accel.edit: the image is a {type(image).__name__}; pass " + _ACCEPTED_IMAGES)


def _rgb_array(array: np.ndarray):
    shape = "x".join(map(str, array.shape))
    if array.ndim == 4 and array.shape[0] > 1:
        raise InvalidOptionError(
            f"accel.edit: edits one image at a time; got a batch of {array.shape[0]} ({shape}): pass "
            + _ACCEPTED_IMAGES
        )
    if array.ndim == 4:
        array = array[0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4) or 0 in array.shape:
        raise InvalidOptionError(
            f"accel.edit: a numpy image of shape {shape} is not a channels-last image (HxW, or HxWxC with C 1 to 4; "
            "from CxHxW use array.transpose(1, 2, 0)); pass " + _ACCEPTED_IMAGES
        )
    # Grey (+ alpha) -> RGB, RGB(A) -> RGB: alpha is dropped, not composited.
    array = np.repeat(array[..., :1], 3, axis=-1) if array.shape[-1] < 3 else array[..., :3]
    if array.dtype == np.uint8:
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(array))  # the image processor reads numpy arrays as [0, 1] floats
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidOptionError(
            f"accel.edit: a numpy image of dtype {array.dtype} is neither uint8 (0..255) nor float ([0, 1]): convert "
            "it, e.g. array.astype(np.uint8) for 8-bit values or array / 65535 for 16-bit ones; pass "
            + _ACCEPTED_IMAGES
        )
    _check_range(float(array.min()), float(array.max()), "numpy")
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def _rgb_tensor(tensor: torch.Tensor) -> torch.Tensor:
    shape = "x".join(map(str, tensor.shape))
    if tensor.ndim == 4 and tensor.shape[0] > 1:
        raise InvalidOptionError(
            f"accel.edit: edits one image at a time; got a batch of {tensor.shape[0]} ({shape}): pass "
            + _ACCEPTED_IMAGES
        )
    if tensor.ndim not in (3, 4) or tensor.shape[-3] != 3 or 0 in tensor.shape:
        hint = " (from HxWx3 use tensor.permute(2, 0, 1))" if tensor.ndim in (3, 4) and tensor.shape[-1] == 3 else ""
        raise InvalidOptionError(
            f"accel.edit: a tensor image of shape {shape} is not channels-first RGB (3xHxW or 1x3xHxW){hint}; pass "
            + _ACCEPTED_IMAGES
        )
    if not tensor.is_floating_point():
        raise InvalidOptionError(
            f"accel.edit: a tensor image of dtype {tensor.dtype} must be float in [0, 1] (e.g. tensor.float() / 255); "
            "pass " + _ACCEPTED_IMAGES
        )
    _check_range(float(tensor.min()), float(tensor.max()), "tensor")
    # Clipped: below 0 the image processor would take the image for one in [-1, 1] and skip normalising it.
    return tensor.clamp(0.0, 1.0)


def _check_range(low: float, high: float, kind: str) -> None:
    if low >= -_RANGE_SLACK and high <= 1 + _RANGE_SLACK:  # False for NaN too
        return
    if math.isnan(low) or math.isnan(high):
        hint = "it holds NaN"
    elif low >= 0 and high <= 255:
        hint = "values up to 255 are 8-bit ones: divide by 255 or pass uint8"
    elif low >= -1 and high <= 1:
        hint = "values in [-1, 1]: pass (image + 1) / 2"
    else:
        hint = "rescale it to [0, 1]"
    raise InvalidOptionError(
        f"accel.edit: a float {kind} image must hold values in [0, 1]; this one spans [{low:.4g}, {high:.4g}] "
        f"({hint}); accepted: " + _ACCEPTED_IMAGES
    )


def image_latents(pipe, image) -> torch.Tensor:
    """The image's VAE latent (posterior mean, scaled), checking that its size suits the UNet. ``image``: see
    `_rgb_image` (alpha is dropped)."""
    image = _rgb_image(image)
    # Checked before the image processor, which would resize the image to its own multiple without a word.
    if isinstance(image, np.ndarray):
        height, width = image.shape[-3:-1]
    elif isinstance(image, torch.Tensor):
        height, width = image.shape[-2:]
    else:
        height, width = image.height, image.width
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)
    if height % multiple or width % multiple:
        fit = (max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple))
        raise InvalidOptionError(
            f"accel.edit: the image is {width}x{height}; this pipeline needs sides divisible by {multiple} "
            f"(VAE factor {pipe.vae_scale_factor} x the UNet's down-sampling): resize it, e.g. to {fit[1]}x{fit[0]}"
        )
    pixels = pipe.image_processor.preprocess(image)
    vae = pipe.vae
    with torch.no_grad():
        latent = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return latent.float() * vae.config.scaling_factor


def _decode(pipe, latent: torch.Tensor):
    vae = pipe.vae
    with torch.no_grad():
        pixels = vae.decode((latent / vae.config.scaling_factor).to(vae.dtype)).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0]


class _Schedule:
    """DDIM without noise (eta 0), written out so that null-text inversion can differentiate through a step."""

    def __init__(self, pipe, steps: int, device):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        self.timesteps = scheduler.timesteps
        cumulative = scheduler.alphas_cumprod.to(device)
        self.alphas = [cumulative[t] for t in self.timesteps] + [scheduler.final_alpha_cumprod.to(device)]
        self.prediction = scheduler.config.prediction_type

    def move(self, latent, output, index: int, target: int) -> torch.Tensor:
        """From the noise level of schedule index ``index`` to that of ``target`` (``len(timesteps)``: clean)."""
        alpha, alpha_to = self.alphas[index], self.alphas[target]
        if self.prediction == "v_prediction":
            clean = alpha.sqrt() * latent - (1 - alpha).sqrt() * output
            noise = alpha.sqrt() * output + (1 - alpha).sqrt() * latent
        else:
            noise = output
            clean = (latent - (1 - alpha).sqrt() * noise) / alpha.sqrt()
        return alpha_to.sqrt() * clean + (1 - alpha_to).sqrt() * noise


class _Encoder:
    """Prompt embeddings, with learned vectors standing in for some tokens' input embeddings (DPL's dynamic tokens)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.table = pipe.text_encoder.get_input_embeddings()

    def ids(self, prompt: str) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        return tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.pipe.text_encoder.device)

    def __call__(self, prompt: str, replaced: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        handle = None
        if replaced:
            positions = torch.tensor(sorted(replaced))
            vectors = torch.stack([replaced[p] for p in sorted(replaced)])

            def substitute(module, args, output):
                output = output.clone()
                output[:, positions] = vectors.to(output)
                return output

            handle = self.table.register_forward_hook(substitute)
        try:
            return self.pipe.text_encoder(self.ids(prompt))[0].float()
        finally:
            if handle is not None:
                handle.remove()

    def rows(self, prompt: str, positions) -> dict[int, torch.Tensor]:
        ids = self.ids(prompt)[0]
        return {p: self.table.weight[ids[p]].detach().float().clone() for p in positions}


@dataclass(frozen=True)
class _Words:
    """Which words an edit works on, as word indices of each prompt (a word may occur twice: "a red circle and a
    blue circle")."""

    source: list[PromptWord]
    target: list[PromptWord]
    dynamic: list[int]  # source words DPL learns
    blend_source: list[int]
    blend_target: list[int]

    def tokens(self, words: list[PromptWord], indices: list[int]) -> list[tuple[int, ...]]:
        return [words[i].tokens for i in indices]


def run_edit(pipe, image, source: str, target: str, config) -> EditResult:
    """``accel.edit``'s work (``config``: an ``accel.EditConfig``).

    ``image``: one image; a PIL image of any 8-bit mode, a uint8 numpy array (HxW grey, HxWx3, HxWx4 RGBA), or a
    float numpy array (HxWx3) / tensor (3xHxW, 1x3xHxW) in [0, 1]. Alpha is dropped, not composited. Other inputs
    raise `InvalidOptionError` naming these.

    Prompts whose every difference lies past the text encoder's token limit raise `InvalidOptionError` (they encode
    the same, so the edit would be the reconstruction); differences past it beside ones within it are named in a
    warning. The default blend words are described in `_blend_words`.
    """
    check_pipeline(pipe)
    tokenizer = pipe.tokenizer
    alignment = align_prompts(tokenizer, source, target)
    source_words, target_words = prompt_words(tokenizer, source), prompt_words(tokenizer, target)
    _check_change_is_encoded(tokenizer, source, target, source_words, alignment)
    _warn_of_changes_past_the_limit(tokenizer, source, target, source_words, target_words)
    blend_source, blend_target = _blend_words(source, target, source_words, target_words, alignment, config)
    words = _Words(
        source=source_words,
        target=target_words,
        dynamic=_dynamic_words(source, source_words, config) if config.method == "dpl" else [],
        blend_source=blend_source,
        blend_target=blend_target,
    )
    equalizer = _equalizer(tokenizer, target_words, config.reweight)

    unet = pipe.unet
    with torch.inference_mode(False):
        latent = image_latents(pipe, image).to(unet.device)
    layout = LatentLayout(grid=tuple(latent.shape[-2:]))
    controller = EditController(layout=layout, map_side=config.map_side)
    controller.self_grid = self_attention_grid(layout.grid)
    controller.self_replace_side = max(1, int(max(layout.grid) * config.self_replace_side))
    originals = unet.attn_processors
    # Sliced and xformers attention only save memory: the edit's processors stand in for them and give them back.
    replaceable = UNetFamily.replaceable_processors | {"SlicedAttnProcessor", "XFormersAttnProcessor"}
    foreign = {name: type(p).__name__ for name, p in originals.items() if type(p).__name__ not in replaceable}
    if foreign:
        name, kind = next(iter(foreign.items()))
        raise InvalidOptionError(
            f"accel.edit: {name} (and {len(foreign) - 1} more) uses {kind}, whose behaviour the edit's own processors "
            f"would drop (they replace only {', '.join(sorted(replaceable))}); remove it first (e.g. "
            "pipe.unload_ip_adapter(), or pipe.unet.set_attn_processor(AttnProcessor2_0()))"
        )
    unet.set_attn_processor({name: EditAttnProcessor(controller, name) for name in originals})
    dtypes = {name: getattr(pipe, name).dtype for name in ("unet", "text_encoder")}
    try:
        for name, dtype in dtypes.items():
            if dtype != torch.float32:
                getattr(pipe, name).float()
        # Inversion and DPL differentiate through the UNet, also when the caller runs under no_grad or inference_mode.
        with torch.inference_mode(False), torch.enable_grad():
            return _edit(pipe, latent, source, target, config, controller, alignment, words, equalizer)
    finally:
        unet.set_attn_processor(originals)
        for name, dtype in dtypes.items():
            if dtype != torch.float32:
                getattr(pipe, name).to(dtype)


# DPL clusters the self-attention of SD's 32 x 32 level (its 512² images).
SELF_ATTENTION_SIDE = 32


def self_attention_grid(latent_grid: tuple[int, ...]) -> tuple[int, ...]:
    """The UNet level whose self-attention DPL clusters: half the latent (DPL's 32 x 32 of SD's 64 x 64), and at
    larger images the first level down with sides of at most 32 (to the UNet's deepest, the third halving), since
    the recorded N x N sum grows with the fourth power of the image side."""
    grid = tuple(math.ceil(side / 2) for side in latent_grid)
    for _ in range(2):
        if max(grid) <= SELF_ATTENTION_SIDE:
            break
        grid = tuple(math.ceil(side / 2) for side in grid)
    return grid


def _edit(pipe, latent, source, target, config, controller, alignment, words: _Words, equalizer) -> EditResult:
    unet, tokenizer = pipe.unet, pipe.tokenizer
    schedule = _Schedule(pipe, config.num_inference_steps, latent.device)
    steps = len(schedule.timesteps)
    encode = _Encoder(pipe)
    source_embeds = encode(source).detach()
    dynamic = words.tokens(words.source, words.dynamic)
    losses: dict[str, list[float]] = {"null_text": []}
    seconds = {}

    def predict(z, index, text):
        return unet(z, schedule.timesteps[index], encoder_hidden_states=text).sample.float()

    # 1. DDIM inversion under the source prompt; DPL also averages the attention it needs for the background.
    started = time.perf_counter()
    inverted = [latent]
    word_map_sum = None
    with torch.no_grad():
        for index in reversed(range(steps)):
            z = inverted[0]
            if dynamic:
                with controller.recording():
                    output = predict(z, index, source_embeds)
                maps = editing.word_maps(controller.cross_maps(), dynamic)[0]
                word_map_sum = maps if word_map_sum is None else word_map_sum + maps
            else:
                output = predict(z, index, source_embeds)
            inverted.insert(0, schedule.move(z, output, index + 1, index))
    seconds["inversion"] = time.perf_counter() - started

    background = None
    if dynamic:
        grid = controller.self_grid
        labels = editing.kmeans(controller.self_attention_mean(), config.dpl_clusters, seed=config.seed)
        # Clustered once: the later passes need not record (an N x N sum per layer call).
        controller.self_grid = controller.self_sum = None
        background = editing.background_from_clusters(labels, grid, word_map_sum / steps)
        map_grid = tuple(word_map_sum.shape[-2:])
        if map_grid != grid:
            resized = torch.nn.functional.interpolate(background[None, None], size=map_grid, mode="bilinear")
            background = (resized[0, 0] >= 0.5).float()
        background = background.to(latent.device)
        losses.update(dpl_first=[], dpl_last=[])

    # 2-3. Per step: DPL's token learning, then null-text inversion with those tokens.
    started = time.perf_counter()
    null = encode("").detach()
    nulls, learned, source_conditionals = [], [], []
    vectors = encode.rows(source, [p for tokens in dynamic for p in tokens])
    prompt_tokens = len(tokenizer(source, truncation=True)["input_ids"]) - 1
    z = inverted[0]
    for index in range(steps):
        if dynamic:
            vectors = _learn_tokens(
                encode,
                predict,
                controller,
                source,
                z,
                index,
                steps,
                vectors,
                dynamic,
                prompt_tokens,
                background,
                config,
                losses,
            )
        learned.append(vectors)
        conditional_embeds = encode(source, vectors).detach() if dynamic else source_embeds
        source_conditionals.append(conditional_embeds)
        null, z = _null_text_step(predict, schedule, z, index, steps, null, conditional_embeds, inverted, config)
        nulls.append(null)
        losses["null_text"].append(float(torch.nn.functional.mse_loss(z, inverted[index + 1])))
    seconds["learning"] = time.perf_counter() - started

    # 4. Source and edit together, with attention injection and the local blend.
    started = time.perf_counter()
    controller.mapper, controller.keep_source = alignment.mapper.to(latent.device), alignment.keep_source
    controller.equalizer = equalizer
    controller.cross_replace, controller.self_replace = config.cross_replace, config.self_replace
    controller.blend_sums.clear()
    # The learned nouns keep their vectors in the edit prompt wherever the alignment matches them word for word.
    to_source = {s: t for t, s in alignment.matched.items()}
    shared = {
        target_token: source_token
        for s in words.dynamic
        if s in to_source and len(words.source[s].tokens) == len(words.target[to_source[s]].tokens)
        for source_token, target_token in zip(words.source[s].tokens, words.target[to_source[s]].tokens, strict=True)
    }
    target_embeds = encode(target).detach()
    blend_source = words.tokens(words.source, words.blend_source)
    blend_target = words.tokens(words.target, words.blend_target)
    pair = torch.cat([inverted[0], inverted[0]])
    mask = None
    with torch.no_grad():
        for index in range(steps):
            edit_embeds = (
                encode(target, {t: learned[index][s] for t, s in shared.items()}) if dynamic else target_embeds
            )
            conditional = [source_conditionals[index], edit_embeds]
            text = torch.cat([nulls[index], nulls[index], *conditional])
            with controller.editing(index / steps):
                output = predict(torch.cat([pair, pair]), index, text)
            unconditional, conditional_out = output.chunk(2)
            guided = unconditional + config.guidance_scale * (conditional_out - unconditional)
            pair = schedule.move(pair, guided, index, index + 1)
            if (blend_source or blend_target) and (index + 1) / steps > config.blend_start:
                mask = _blend_region(controller.blend_maps(), blend_source, blend_target, pair.shape[-2:], config)
                pair = torch.cat([pair[:1], pair[:1] + mask * (pair[1:] - pair[:1])])
    seconds["edit"] = time.perf_counter() - started
    return EditResult(
        image=_decode(pipe, pair[1:]),
        reconstruction=_decode(pipe, pair[:1]),
        blend_mask=None if mask is None else mask[0, 0].cpu().numpy(),
        background=None if background is None else background.cpu().numpy(),
        blend_words=[words.source[i].text for i in words.blend_source]
        + [words.target[i].text for i in words.blend_target],
        dynamic_words=[words.source[i].text for i in words.dynamic],
        losses=losses,
        seconds=seconds,
    )


def _blend_region(maps, blend_source, blend_target, size, config) -> torch.Tensor:
    """The union of the source row's region of its blend words and the edit row's of its own."""
    regions = [
        editing.blend_mask(editing.word_maps(maps[row : row + 1], tokens), size, config.blend_threshold)
        for row, tokens in ((0, blend_source), (1, blend_target))
        if tokens
    ]
    return torch.stack(regions).amax(dim=0)


def _null_text_step(predict, schedule, z, index, steps, null, conditional_embeds, inverted, config):
    """Null-text inversion at one step: Adam on the unconditional embedding until the guided DDIM step lands on the
    inverted latent; returns the embedding and the latent it steps to."""
    with torch.no_grad():
        conditional = predict(z, index, conditional_embeds)
    null = null.clone().requires_grad_()
    optimizer = torch.optim.Adam([null], lr=config.null_text_lr * (1 - 0.5 * index / steps))
    goal = inverted[index + 1]

    def step_to(embedding):
        unconditional = predict(z, index, embedding)
        guided = unconditional + config.guidance_scale * (conditional - unconditional)
        return schedule.move(z, guided, index, index + 1)

    for _ in range(config.null_text_steps):
        loss = torch.nn.functional.mse_loss(step_to(null), goal)
        # autograd.grad, not backward: the UNet's parameters must not gather gradients of the user's model.
        (null.grad,) = torch.autograd.grad(loss, [null])
        optimizer.step()
        if loss.item() < 1e-5 + 2e-5 * index * 50 / steps:
            break
    null = null.detach()
    with torch.no_grad():
        return null, step_to(null)


def _learn_tokens(
    encode, predict, controller, source, z, index, steps, vectors, positions, prompt_tokens, background, config, losses
):
    """One step of DPL: update the nouns' embeddings against the three leakage losses (fresh AdamW each step, stop
    early once every loss is under its decaying target)."""
    scaled = index * 50 / steps  # DPL's targets decay per step of a 50-step schedule
    targets = [
        beta * math.exp(-scaled / alpha) for beta, alpha in zip(config.dpl_targets, config.dpl_decays, strict=True)
    ]
    parameters = {p: v.clone().requires_grad_() for p, v in vectors.items()}
    optimizer = torch.optim.AdamW(list(parameters.values()), lr=config.dpl_lr)
    has_background = bool(background.sum() > 0)
    counts = torch.tensor([len(t) for t in positions], dtype=torch.float32, device=z.device)[:, None, None]
    first = last = None
    for iteration in range(config.dpl_steps + 1):
        with controller.recording(stop_early=True):
            predict(z, index, encode(source, parameters))
        maps = controller.cross_maps()
        controller.maps.clear()
        words = editing.word_maps(maps, positions) / counts
        balance = controls.attend_excite_loss(controls.concept_maps(maps, positions, prompt_tokens)).sum()
        disjoint = editing.disjoint_loss(words).sum()
        leakage = editing.background_loss(words, background[None]).sum() if has_background else balance * 0
        weights = config.dpl_weights
        loss = weights[0] * balance + weights[1] * leakage + weights[2] * disjoint
        last = loss.item()
        first = last if first is None else first
        done = balance.item() < targets[0] and leakage.item() < targets[1] and disjoint.item() < targets[2]
        if done or iteration == config.dpl_steps:
            break
        learned = list(parameters.values())
        for vector, grad in zip(learned, torch.autograd.grad(loss, learned, allow_unused=True), strict=True):
            vector.grad = grad
        optimizer.step()
    losses["dpl_first"].append(first)
    losses["dpl_last"].append(last)
    return {p: v.detach() for p, v in parameters.items()}


def _occurrences(words: list[PromptWord], wanted: str) -> list[int]:
    return [i for i, w in enumerate(words) if _key(w.text) == _key(wanted)]


def _listing(words: list[PromptWord]) -> str:
    return ", ".join(repr(w.text) for w in words)


def _check_change_is_encoded(tokenizer, source: str, target: str, source_words, alignment) -> None:
    """Refuses prompts that differ only in words the text encoder never reads: truncated, both encode the same,
    and the edit would silently return the reconstruction."""
    if alignment.changed:
        return  # a difference within the limit (differences past it are dropped, as for any prompt)
    source_keys, target_keys = [_key(w) for w in source.split()], [_key(w) for w in target.split()]
    if source_keys == target_keys:
        return  # the same words (case and punctuation aside): a reweight-only edit, or none
    # No change among the words that fit, so both prompts keep the same number of words and the first difference
    # lies after them.
    first = next(
        i for i, (s, t) in enumerate(itertools.zip_longest(source_keys, target_keys, fillvalue=None)) if s != t
    )
    source_split, target_split = source.split(), target.split()
    if first < len(source_split) and first < len(target_split):
        change = f"{source_split[first]!r} -> {target_split[first]!r}"
    elif first < len(target_split):
        change = f"adds {target_split[first]!r}"
    else:
        change = f"drops {source_split[first]!r}"
    kept = len(source_words)
    bos = source_words[0].tokens[0] if source_words else 1
    length = tokenizer.model_max_length
    last = f" (up to {source_words[-1].text!r})" if source_words else ""
    raise InvalidOptionError(
        f"accel.edit: every word the edit changes lies past the text encoder's limit: it reads {length} tokens, "
        f"{length - bos - 1} of them for words (the rest special tokens), which hold the first {kept} words of each "
        f"prompt{last}; the first change ({change}) is word {first + 1}, so both prompts encode the same and the edit "
        f"would return the reconstruction. Shorten the prompts so that the changed words are among the first {kept}"
    )


def _warn_of_changes_past_the_limit(tokenizer, source: str, target: str, source_words, target_words) -> None:
    """An edit made partly within the token limit is run, but what the limit changes is named: differences past it are
    not made, and a word both prompts share that only one of them fits in is removed (or added) by the edit."""
    source_split, target_split = source.split(), target.split()
    matcher = difflib.SequenceMatcher(
        a=[_key(w) for w in source_split], b=[_key(w) for w in target_split], autojunk=False
    )
    read_source, read_target = len(source_words), len(target_words)
    dropped = [
        (" ".join(source_split[i1:i2]), " ".join(target_split[j1:j2]))
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag != "equal" and i1 >= read_source and j1 >= read_target
    ]
    shared = [(a + k, b + k) for a, b, size in matcher.get_matching_blocks() for k in range(size)]
    removed = [source_split[i] for i, j in shared if i < read_source <= j]
    added = [target_split[j] for i, j in shared if j < read_target <= i]
    if not (dropped or removed or added):
        return
    effects = []
    if dropped:
        effects.append(
            "these changes lie past them and are not made: " + "; ".join(f"{a!r} -> {b!r}" for a, b in dropped)
        )
    if removed:
        effects.append(f"the edit removes {', '.join(map(repr, removed))}, which the edit prompt pushes past them")
    if added:
        effects.append(f"the edit adds {', '.join(map(repr, added))}, which the source prompt holds only past them")
    logger.warning(
        "accel.edit: the text encoder reads %d tokens, which hold the first %d words of the source prompt and %d of "
        "the edit prompt; %s. Shorten the prompts so that both hold every word that matters",
        tokenizer.model_max_length,
        read_source,
        read_target,
        "; ".join(effects),
    )


def _blend_words(source, target, source_words, target_words, alignment, config) -> tuple[list[int], list[int]]:
    """Word indices whose maps bound the edit, in the source and in the edit prompt.

    By default (``blend_words=None``) the edit blends on the head noun (last word) of each noun phrase it changes,
    in both prompts where the head is shared ("a red circle" -> "a green circle": "circle"). Words the edit changes
    outside any noun phrase are dropped when the run of changed words they belong to also changes a phrase: the
    connectors that come with an added or removed phrase ("and", "next to" in "a red circle" -> "a red circle next
    to a blue square" blend on "square" alone). A run that changes no phrase (a lone noun "cats" -> "dogs", a
    relation "left" -> "right", a verb) still blends on its own words; pass ``blend_words=[...]`` to choose.
    """
    if not config.local_blend:
        return [], []
    if config.blend_words is not None:
        chosen_source, chosen_target = [], []
        for word in config.blend_words:
            in_source, in_target = _occurrences(source_words, word), _occurrences(target_words, word)
            if not in_source and not in_target:
                raise InvalidOptionError(
                    f"accel.edit: blend word {word!r} is in neither prompt; source words: {_listing(source_words)}; "
                    f"edit words: {_listing(target_words)}"
                )
            chosen_source += in_source
            chosen_target += in_target
        return sorted(set(chosen_source)), sorted(set(chosen_target))
    to_target = {s: t for t, s in alignment.matched.items()}
    changed_source = [s for s, _ in alignment.changed if s is not None]
    changed_target = [t for _, t in alignment.changed if t is not None]
    chosen_source, chosen_target = set(), set()
    for prompt, words, changed, chosen, chosen_other, counterpart in (
        (source, source_words, changed_source, chosen_source, chosen_target, to_target),
        (target, target_words, changed_target, chosen_target, chosen_source, alignment.matched),
    ):
        heads = _phrase_heads(prompt, words)
        # Matched words separate the alignment's differing blocks, so a run of consecutive changed words is one
        # block's share of this prompt: a phrase change and the connectors added or removed with it.
        for run in _runs(changed):
            for index in [i for i in run if i in heads] or run:
                head = heads.get(index, index)
                chosen.add(head)
                if head in counterpart:
                    chosen_other.add(counterpart[head])
    return sorted(chosen_source), sorted(chosen_target)


def _dynamic_words(source, source_words, config) -> list[int]:
    if config.dynamic_words is not None:
        chosen = []
        for word in config.dynamic_words:
            found = _occurrences(source_words, word)
            if not found:
                raise InvalidOptionError(
                    f"accel.edit: dynamic word {word!r} is not in the source prompt {source!r}; its words are: "
                    + _listing(source_words)
                )
            chosen += found
        return sorted(set(chosen))
    return [p.words[1] - 1 for p in noun_phrases(source) if p.words[1] <= len(source_words)]


def _equalizer(tokenizer, target_words, reweight) -> torch.Tensor | None:
    if not reweight:
        return None
    scales = torch.ones(tokenizer.model_max_length)
    for word, scale in reweight.items():
        found = _occurrences(target_words, word)
        if not found:
            raise InvalidOptionError(
                f"accel.edit: reweighted word {word!r} is not in the edit prompt; its words are: "
                + _listing(target_words)
            )
        for index in found:
            scales[list(target_words[index].tokens)] = float(scale)
    return scales
