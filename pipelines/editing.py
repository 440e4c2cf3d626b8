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
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from accel.errors import InvalidOptionError, UnsupportedModelError
from accel.kernels import controls, editing
from accel.pipelines.families import UNetFamily
from accel.pipelines.prompts import PromptWord, noun_phrases, prompt_words
from accel.processors.editing import EditAttnProcessor, EditController
from accel.processors.state import LatentLayout


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


def _head_noun(prompt: str, words: list[PromptWord], index: int) -> int:
    """The index of the last word of the noun phrase holding word ``index`` (the word itself outside any phrase)."""
    for phrase in noun_phrases(prompt):
        if phrase.words[0] <= index < phrase.words[1]:
            return min(phrase.words[1], len(words)) - 1
    return index


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


def image_latents(pipe, image) -> torch.Tensor:
    """The image's VAE latent (posterior mean, scaled), checking that its size suits the UNet."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        from PIL import Image

        image = Image.fromarray(image)  # the image processor reads numpy arrays as floats in [0, 1]
    pixels = pipe.image_processor.preprocess(image)
    height, width = pixels.shape[-2:]
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)
    if height % multiple or width % multiple:
        fit = (max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple))
        raise InvalidOptionError(
            f"accel.edit: the image is {width}x{height}; this pipeline needs sides divisible by {multiple} "
            f"(VAE factor {pipe.vae_scale_factor} x the UNet's down-sampling): resize it, e.g. to {fit[1]}x{fit[0]}"
        )
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
    """``accel.edit``'s work (``config``: an ``accel.EditConfig``)."""
    check_pipeline(pipe)
    tokenizer = pipe.tokenizer
    alignment = align_prompts(tokenizer, source, target)
    source_words, target_words = prompt_words(tokenizer, source), prompt_words(tokenizer, target)
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
    latent = image_latents(pipe, image).to(unet.device)
    layout = LatentLayout(grid=tuple(latent.shape[-2:]))
    controller = EditController(layout=layout, map_side=config.map_side)
    # Self-attention is clustered at half the latent's resolution (DPL: 32 x 32 of SD's 64 x 64).
    controller.self_grid = tuple(math.ceil(side / 2) for side in layout.grid)  # the UNet's second level
    controller.self_replace_side = max(1, int(max(layout.grid) * config.self_replace_side))
    originals = unet.attn_processors
    replaceable = UNetFamily.replaceable_processors
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
        return _edit(pipe, latent, source, target, config, controller, alignment, words, equalizer)
    finally:
        unet.set_attn_processor(originals)
        for name, dtype in dtypes.items():
            if dtype != torch.float32:
                getattr(pipe, name).to(dtype)


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
        optimizer.zero_grad()
        loss.backward()
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
        with controller.recording():
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
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    losses["dpl_first"].append(first)
    losses["dpl_last"].append(last)
    return {p: v.detach() for p, v in parameters.items()}


def _occurrences(words: list[PromptWord], wanted: str) -> list[int]:
    return [i for i, w in enumerate(words) if _key(w.text) == _key(wanted)]


def _listing(words: list[PromptWord]) -> str:
    return ", ".join(repr(w.text) for w in words)


def _blend_words(source, target, source_words, target_words, alignment, config) -> tuple[list[int], list[int]]:
    """Word indices whose maps bound the edit, in the source and in the edit prompt."""
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
    chosen_source, chosen_target = set(), set()
    for s, t in alignment.changed:
        if s is not None:
            head = _head_noun(source, source_words, s)
            chosen_source.add(head)
            if head in to_target:
                chosen_target.add(to_target[head])
        if t is not None:
            head = _head_noun(target, target_words, t)
            chosen_target.add(head)
            if head in alignment.matched:
                chosen_source.add(alignment.matched[head])
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
