"""The "shapes" world: procedural images of coloured shapes with captions, and the shipped ``shapes-sd`` pipeline.

Without real weights and without a hub, the quality of an approximate attention method cannot be measured on
random-weight models. accel therefore ships a small Stable-Diffusion-architecture model trained from scratch on this
generator (``accel.pipelines.shapes_train``), and a procedural detector (``accel.pipelines.shapes_detector``) that
scores what it draws.

Images: 1 or 2 shapes (or two copies of one) on a grey background, plain or with low-contrast texture. Objects are
saturated and backgrounds are not, so colour segmentation can find the objects. Captions follow a small grammar::

    a red circle
    a blue square and a yellow triangle
    a green star left of a red circle
    two red circles
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (235, 210, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 50, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
RELATIONS = ("left of", "right of")
COUNT_WORDS = {2: "two"}

BASE_RESOLUTION = 64
WEIGHTS_DIR = Path(__file__).parent / "weights" / "shapes-sd"

# The smallest object radius, as a share of the image side: below it stars lose their points when rasterised and
# neither the model nor the detector can tell shapes apart.
MIN_RADIUS, MAX_RADIUS = 0.16, 0.24


@dataclass(frozen=True)
class ShapeObject:
    """One object: colour and shape names, centre ``(x, y)`` and radius as shares of the image side."""

    colour: str
    shape: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    caption: str
    objects: tuple[ShapeObject, ...]

    def requested(self) -> dict[tuple[str, str], int]:
        """How many objects of each (colour, shape) the caption asks for."""
        counts: dict[tuple[str, str], int] = {}
        for obj in self.objects:
            counts[(obj.colour, obj.shape)] = counts.get((obj.colour, obj.shape), 0) + 1
        return counts


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order (the tokenizer is built from it)."""
    words = ["a", "and", "of", "left", "right", *COUNT_WORDS.values(), *COLOURS, *SHAPES, *PLURALS.values()]
    return list(dict.fromkeys(words))


def caption_for(objects: tuple[ShapeObject, ...], kind: str) -> str:
    first = objects[0]
    if kind == "single":
        return f"a {first.colour} {first.shape}"
    if kind == "count":
        return f"{COUNT_WORDS[len(objects)]} {first.colour} {PLURALS[first.shape]}"
    second = objects[1]
    if kind == "pair":
        return f"a {first.colour} {first.shape} and a {second.colour} {second.shape}"
    relation = "left of" if first.x < second.x else "right of"
    return f"a {first.colour} {first.shape} {relation} a {second.colour} {second.shape}"


def sample_scene(rng: np.random.Generator, kind: str | None = None) -> Scene:
    """A random scene; ``kind`` is ``single``, ``pair``, ``relation`` or ``count`` (random by default)."""
    if kind is None:
        kind = rng.choice(["single", "pair", "relation", "count"], p=[0.45, 0.25, 0.15, 0.15])
    if kind == "single":
        specs = [(_pick(rng, COLOURS), _pick(rng, SHAPES))]
    elif kind == "count":
        specs = [(_pick(rng, COLOURS), _pick(rng, SHAPES))] * 2
    else:
        first = (_pick(rng, COLOURS), _pick(rng, SHAPES))
        second = first
        while second == first:
            second = (_pick(rng, COLOURS), _pick(rng, SHAPES))
        specs = [first, second]
    objects = _place(rng, specs, separate_x=kind == "relation")
    return Scene(caption_for(objects, kind), objects)


def scene_from_caption(caption: str, rng: np.random.Generator) -> Scene:
    """A scene matching ``caption`` (random placement): what a prompt asks for, for scoring generated images."""
    words = caption.split()
    if words[0] in COUNT_WORDS.values():
        count = {v: k for k, v in COUNT_WORDS.items()}[words[0]]
        shape = next(s for s, p in PLURALS.items() if p == words[2])
        specs = [(words[1], shape)] * count
        kind = "count"
    else:
        specs = [(words[1], words[2])]
        kind = "single"
        if len(words) > 3:
            specs.append((words[-2], words[-1]))
            kind = "pair" if words[3] == "and" else "relation"
    for colour, shape in specs:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"caption {caption!r} is outside the shapes grammar ({colour!r} {shape!r})")
    objects = _place(rng, specs, separate_x=kind == "relation")
    if kind == "relation" and (words[3] == "left") != (objects[0].x < objects[1].x):
        objects = (
            ShapeObject(objects[0].colour, objects[0].shape, objects[1].x, objects[0].y, objects[0].radius),
            ShapeObject(objects[1].colour, objects[1].shape, objects[0].x, objects[1].y, objects[1].radius),
        )
    return Scene(caption, objects)


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _place(rng: np.random.Generator, specs, separate_x: bool) -> tuple[ShapeObject, ...]:
    """Non-overlapping placement; relation scenes keep the objects apart horizontally so left/right is unambiguous."""
    for _ in range(200):
        objects = []
        for colour, shape in specs:
            radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS)) * (0.85 if len(specs) > 1 else 1.0)
            x, y = (float(v) for v in rng.uniform(radius + 0.02, 1 - radius - 0.02, size=2))
            objects.append(ShapeObject(colour, shape, x, y, radius))
        if len(objects) == 1:
            return tuple(objects)
        a, b = objects
        gap = math.hypot(a.x - b.x, a.y - b.y) - a.radius - b.radius
        if gap > 0.04 and (not separate_x or abs(a.x - b.x) > a.radius + b.radius):
            return tuple(objects)
    raise RuntimeError("could not place the objects without overlap")


def _star_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    inner = radius * 0.45
    points = []
    for i in range(10):
        angle = -math.pi / 2 + i * math.pi / 5
        r = radius if i % 2 == 0 else inner
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """``uint8 [size, size, 3]`` image of ``scene`` on a grey, plain or textured, background."""
    from PIL import Image, ImageDraw

    # Draw at 4x and downsample: anti-aliased edges look like what a model generates and keep small stars starry.
    scale = 4
    canvas = size * scale
    background = _background(rng, size)
    image = Image.fromarray(background.repeat(scale, axis=0).repeat(scale, axis=1))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[obj.colour])
        _draw(draw, obj, canvas, colour)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def _draw(draw, obj: ShapeObject, canvas: int, fill) -> None:
    cx, cy, r = obj.x * canvas, obj.y * canvas, obj.radius * canvas
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        half = r * 0.85
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif obj.shape == "triangle":
        # Equilateral, pointing up, centred on its centroid.
        draw.polygon(
            [(cx, cy - r), (cx - r * math.sqrt(3) / 2, cy + r / 2), (cx + r * math.sqrt(3) / 2, cy + r / 2)],
            fill=fill,
        )
    else:
        draw.polygon(_star_points(cx, cy, r), fill=fill)


def object_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """``bool [size, size]``: the pixels ``obj`` covers (at least half) when rendered at ``size``."""
    from PIL import Image, ImageDraw

    scale = 4
    image = Image.new("L", (size * scale, size * scale), 0)
    _draw(ImageDraw.Draw(image), obj, size * scale, 255)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX)) >= 128


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    level = float(rng.uniform(60, 200))
    kind = rng.choice(["plain", "noise", "stripes", "checker"], p=[0.4, 0.2, 0.2, 0.2])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "plain":
        texture = np.zeros((size, size), np.float32)
    elif kind == "noise":
        texture = rng.normal(0, 6, (size, size)).astype(np.float32)
    elif kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.25)
        texture = 10 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    else:
        cells = int(rng.integers(4, 9))
        texture = 10 * (((xx * cells).astype(int) + (yy * cells).astype(int)) % 2 * 2 - 1).astype(np.float32)
    grey = np.clip(level + texture, 0, 255)
    # A faint tint keeps backgrounds varied while far below object saturation.
    tint = rng.uniform(-6, 6, size=3).astype(np.float32)
    return np.clip(grey[..., None] + tint, 0, 255).astype(np.uint8)


def dataset(count: int, size: int = BASE_RESOLUTION, seed: int = 0) -> tuple[np.ndarray, list[Scene]]:
    """``count`` seeded images (``uint8 [N, size, size, 3]``) and their scenes."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(count)]
    images = np.stack([render(scene, size, rng) for scene in scenes])
    return images, scenes


def build_tokenizer():
    """A CLIP tokenizer in which every grammar word is one token (byte-level fallback for anything else)."""
    from accel.pipelines.tiny import build_clip_tokenizer

    return build_clip_tokenizer(vocabulary(), model_max_length=16)


def build_untrained_pipeline(seed: int = 0):
    """The ``shapes-sd`` architecture with fresh random weights (the starting point of training).

    The UNet keeps Stable Diffusion 1.5's block types (3 cross-attention down blocks and a plain one, mirrored up),
    so methods built for SD 1.5 apply unchanged; the VAE compresses 4x into 8 channels.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for module in (text_encoder, unet, vae):
        module.eval()
    return pipe


UNET_CONFIG = {
    "sample_size": BASE_RESOLUTION // 4,
    "in_channels": 8,
    "out_channels": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64, 96, 96),
    # One layer per block and 2 heads: the CPU training budget (flash-attention backward with head_dim 8 was 37 % of a
    # step); the block types and names are SD 1.5's.
    "layers_per_block": 1,
    "attention_head_dim": 2,
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    # 8 latent channels at 4x: with 4, stars and triangles came back from the autoencoder as blobs the detector
    # read as circles (25 % of reconstructions scored exactly); 8 cost the UNet nothing measurable.
    "latent_channels": 8,
    "norm_num_groups": 16,
    "sample_size": BASE_RESOLUTION,
    # Attention in the 16x16 middle block was a quarter of a training step and the images have no long-range
    # structure an autoencoder needs to carry.
    "mid_block_add_attention": False,
}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def load_shapes_pipeline(dtype=None):
    """The shipped, trained ``shapes-sd`` pipeline (offline), in fp32 unless ``dtype`` says otherwise."""
    import torch
    from diffusers import StableDiffusionPipeline

    if not (WEIGHTS_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the shapes-sd weights are missing from {WEIGHTS_DIR}; train them with "
            "`python -m accel.pipelines.shapes_train` or reinstall accel"
        )
    pipe = StableDiffusionPipeline.from_pretrained(
        os.fspath(WEIGHTS_DIR), dtype=dtype or torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config()
    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        module.eval()
    pipe.register_to_config(_name_or_path="accel/shapes-sd")
    return pipe


def training_record() -> dict:
    """What training wrote about itself (time, device, losses), shipped beside the weights."""
    path = WEIGHTS_DIR / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}
