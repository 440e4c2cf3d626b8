"""The shapes world: generator, tokenizer, detector, the shipped trained model and the quality benchmark."""

from pathlib import Path

import numpy as np
import pytest
import torch

import accel
from accel.pipelines import shapes, shapes_detector

REPO = Path(__file__).resolve().parents[1]


def test_generator_is_seeded_and_captions_follow_the_grammar():
    images_a, scenes_a = shapes.dataset(16, seed=3)
    images_b, scenes_b = shapes.dataset(16, seed=3)
    assert np.array_equal(images_a, images_b) and scenes_a == scenes_b
    assert images_a.shape == (16, 64, 64, 3) and images_a.dtype == np.uint8
    words = set(shapes.vocabulary())
    for scene in scenes_a:
        assert set(scene.caption.split()) <= words
        assert sum(scene.requested().values()) == len(scene.objects)


@pytest.mark.parametrize(
    ("caption", "requested"),
    [
        ("a red circle", {("red", "circle"): 1}),
        ("a blue square and a yellow triangle", {("blue", "square"): 1, ("yellow", "triangle"): 1}),
        ("a green star left of a red circle", {("green", "star"): 1, ("red", "circle"): 1}),
        ("two red circles", {("red", "circle"): 2}),
    ],
)
def test_scene_from_caption(caption, requested):
    scene = shapes.scene_from_caption(caption, np.random.default_rng(0))
    assert scene.requested() == requested
    if "left of" in caption:
        assert scene.objects[0].x < scene.objects[1].x


def test_caption_outside_the_grammar_is_refused():
    with pytest.raises(ValueError, match="outside the shapes grammar"):
        shapes.scene_from_caption("a pink circle", np.random.default_rng(0))


def test_every_grammar_word_is_one_token():
    tokenizer = shapes.build_tokenizer()
    for word in shapes.vocabulary():
        assert tokenizer.tokenize(word) == [word + "</w>"]


@pytest.mark.parametrize("size", [64, 128])
def test_detector_accuracy_on_generator_images(size):
    rng = np.random.default_rng(1234)
    correct, total = 0, 200
    for _ in range(total):
        scene = shapes.sample_scene(rng)
        correct += shapes_detector.matches_exactly(shapes_detector.detect(shapes.render(scene, size, rng)), scene)
    accuracy = correct / total
    print(f"detector accuracy at {size} px: {accuracy:.3f}")
    assert accuracy >= 0.95


def _outline_image(radius_at, size: int = 64, points: int = 360) -> np.ndarray:
    """A red blob whose outline is ``radius_at(angle)`` (a share of the image), drawn like the generator draws."""
    from PIL import Image, ImageDraw

    scale, centre = 4, size * 2
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    radii = np.array([radius_at(a) for a in angles]) * size * scale
    outline = [(centre + r * np.cos(a), centre + r * np.sin(a)) for a, r in zip(angles, radii, strict=True)]
    image = Image.new("RGB", (size * scale, size * scale), (128, 128, 128))
    ImageDraw.Draw(image).polygon(outline, fill=shapes.COLOURS["red"])
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def _polygon_radius(corners: int, radius: float, bow: float):
    """Outline of a regular polygon with a corner pointing up whose sides sag towards the centre by ``bow`` of the
    corner radius at their middles (what the shipped model draws for squares and triangles)."""

    def radius_at(angle):
        sector = 2 * np.pi / corners
        from_corner = np.abs((angle + np.pi / 2 + sector / 2) % sector - sector / 2)
        straight = radius * np.cos(np.pi / corners) / np.cos(from_corner - np.pi / corners)
        return straight - bow * radius * np.sin(np.pi * from_corner / sector)

    return radius_at


@pytest.mark.parametrize(
    ("outline", "shape"),
    [
        # A square drawn with a corner up is a diamond: rotate by 45 degrees so the sides are axis-aligned.
        (lambda a: _polygon_radius(4, 0.2, 0.15)(a + np.pi / 4), "square"),
        (lambda a: _polygon_radius(4, 0.2, 0.2)(a + np.pi / 4), "square"),
        (lambda a: _polygon_radius(4, 0.2, 0.0)(a + np.pi / 4), "square"),
        (_polygon_radius(3, 0.22, 0.15), "triangle"),
        (_polygon_radius(3, 0.22, 0.0), "triangle"),
        (lambda a: 0.18 * (1 + 0.03 * np.cos(4 * a)), "circle"),
        (lambda a: 0.18, "circle"),
    ],
)
def test_detector_reads_bowed_sides_by_their_corners(outline, shape):
    """Sides that bow inward lower a square's fill to a circle's and a triangle's solidity to a star's; the corner
    count (4, 3) still names them, and a circle with slight bumps stays a circle."""
    (detection,) = shapes_detector.detect(_outline_image(outline))
    assert detection.shape == shape, detection


def test_detector_scores_duplicates_and_misses():
    rng = np.random.default_rng(0)
    two = shapes.scene_from_caption("two red circles", rng)
    image = shapes.render(two, 128, rng)
    asked_one = shapes.scene_from_caption("a red circle", rng)
    score = shapes_detector.score(image, asked_one)
    assert score.adherent and score.duplicates == 1
    asked_blue = shapes.scene_from_caption("a blue circle", rng)
    score = shapes_detector.score(image, asked_blue)
    assert not score.adherent and not score.colour_adherent and score.duplicates == 0


def test_shipped_weights_load_offline_and_are_small():
    files = [p for p in shapes.WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    record = shapes.training_record()
    assert record["unet_steps"] > 0 and record["total_seconds"] > 0
    pipe = accel.load_pipeline("shapes-sd")
    assert pipe.unet.dtype == torch.float32 and not pipe.unet.training
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert image.images.shape == (1, 64, 64, 3)


def test_shipped_autoencoder_keeps_shapes_readable():
    """The detector must still read the VAE's round trip of generator images: the ceiling on what the UNet can score
    (0.965 on 200 held-out images at training time; the 4-channel v0 autoencoder managed 0.25)."""
    from accel.pipelines import shapes_train

    pipe = accel.load_pipeline("shapes-sd")
    with torch.no_grad():
        accuracy = shapes_train._reconstruction_accuracy(pipe.vae, "cpu", count=100, seed=4242)
    print(f"detector accuracy on VAE reconstructions: {accuracy:.2f}")
    assert accuracy >= 0.9


def test_shipped_model_draws_single_objects():
    """A guard on the shipped weights: one seed per single-object prompt, the benchmark's settings.

    The shipped v2 weights get colour and shape right for all 20 prompts at this seed; the issue's bar is 90 %. With
    the fill-only detector this read 0.80 (v2's bowed squares came out as circles) and 0.60 for v1, so a broken load
    or a return to the old weights fails.
    """
    pipe = accel.load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a {c} {s}" for s in shapes.SHAPES for c in shapes.COLOURS]
    images = pipe(
        prompts,
        num_inference_steps=25,
        guidance_scale=6.0,
        generator=[torch.Generator().manual_seed(0) for _ in prompts],
        output_type="np",
    ).images
    rng = np.random.default_rng(0)
    scores = [
        shapes_detector.score(im, shapes.scene_from_caption(p, rng)) for im, p in zip(images, prompts, strict=True)
    ]
    adherence = np.mean([s.adherent for s in scores])
    colour_adherence = np.mean([s.colour_adherent for s in scores])
    print(f"single-object adherence {adherence:.2f}, colour adherence {colour_adherence:.2f}")
    assert colour_adherence >= 0.95
    assert adherence >= 0.9
