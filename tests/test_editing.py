"""accel.edit: prompt alignment, the editing kernels, and null-text inversion / Prompt-to-Prompt / DPL on shapes-sd."""

import json

import numpy as np
import pytest
import torch

import accel
from accel.kernels import editing
from accel.pipelines import shapes
from accel.pipelines.editing import align_prompts


@pytest.fixture(scope="module")
def tokenizer():
    return shapes.build_tokenizer()


@pytest.fixture(scope="module")
def case():
    """A two-object generator image ("a <c> circle and a <c> <shape>") and its scene."""
    rng = np.random.default_rng(3)
    scene = shapes.sample_scene(rng, "pair")
    return scene, shapes.render(scene, shapes.BASE_RESOLUTION, rng)


def test_word_swap_alignment_is_identity_with_the_swap_recorded(tokenizer):
    alignment = align_prompts(tokenizer, "a red circle and a blue square", "a green circle and a blue square")
    assert torch.equal(alignment.mapper, torch.eye(tokenizer.model_max_length))
    assert torch.equal(alignment.keep_source, torch.ones(tokenizer.model_max_length))
    assert alignment.changed == ((1, 1),)
    assert alignment.matched == {0: 0, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}


def test_added_word_keeps_its_own_attention_and_later_tokens_shift(tokenizer):
    alignment = align_prompts(tokenizer, "a circle", "a red circle")
    # tokens: BOS=0, a=1, (red=2), circle=2 -> 3, EOS 3 -> 4, padding after.
    assert alignment.keep_source[2] == 0 and alignment.keep_source.sum() == tokenizer.model_max_length - 1
    assert alignment.mapper[2, 3] == 1 and alignment.mapper[3, 4] == 1 and alignment.mapper[:, 2].sum() == 0
    assert alignment.changed == ((None, 1),)


def test_multi_token_words_average_their_source_tokens():
    from accel.pipelines.tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(["a", "red", "blue", "circle"], model_max_length=16)
    source, target = "a zebra circle", "a blue circle"
    zebra = len(tokenizer("zebra", add_special_tokens=False)["input_ids"])
    assert zebra > 1  # out-of-vocabulary: byte-level pieces
    alignment = align_prompts(tokenizer, source, target)
    column = alignment.mapper[:, 2]  # "blue" takes the mean of zebra's pieces
    assert torch.allclose(column[2 : 2 + zebra], torch.full((zebra,), 1 / zebra))
    assert column.sum() == pytest.approx(1.0)
    assert alignment.mapper[2 + zebra, 3] == 1  # "circle"


def test_kmeans_and_background_find_the_unclaimed_region():
    grid = (8, 8)
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    blob = ((yy < 4) & (xx < 4)).flatten().float()
    features = torch.stack([blob, 1 - blob], dim=1) + 0.01 * torch.randn(
        64, 2, generator=torch.Generator().manual_seed(0)
    )
    labels = editing.kmeans(features, clusters=2)
    assert len(labels.unique()) == 2 and len(labels[blob.bool()].unique()) == 1
    word = blob.view(1, 8, 8)
    background = editing.background_from_clusters(labels, grid, word)
    assert torch.equal(background, 1 - blob.view(8, 8))
    # Both clusters claimed (a second word on the rest): no background, so DPL drops its background loss rather
    # than push a word off its own object.
    claimed = editing.background_from_clusters(labels, grid, torch.stack([blob, 1 - blob]).view(2, 8, 8))
    assert not claimed.any()


def test_blend_mask_scales_out_a_floor():
    maps = torch.full((1, 1, 4, 4), 0.5)
    maps[0, 0, 0, 0] = 1.0
    mask = editing.blend_mask(maps, (8, 8), threshold=0.5)
    assert mask.shape == (1, 1, 8, 8)
    assert 0 < mask.mean() < 0.5  # the peak's dilated neighbourhood only, not the floor everywhere
    assert mask[0, 0, 0, 0] == 1 and mask[0, 0, -1, -1] == 0


def test_dpl_losses_are_zero_for_disjoint_maps_and_one_for_equal():
    a = torch.zeros(1, 1, 4, 4)
    a[..., :2, :] = 1
    b = 1 - a
    assert editing.disjoint_loss(torch.cat([a, b], 1)).item() == 0
    assert editing.disjoint_loss(torch.cat([a, a], 1)).item() == pytest.approx(1.0)
    assert editing.background_loss(a, b[:, 0]).item() == 0


@pytest.mark.parametrize("method", ["p2p", "dpl"])
def test_same_prompt_without_blend_edits_nothing_exactly(shapes_pipe, case, method):
    scene, image = case
    result = accel.edit(
        shapes_pipe,
        image,
        scene.caption,
        scene.caption,
        method=method,
        num_inference_steps=4,
        local_blend=False,
        null_text_steps=2,
        guidance_scale=6.0,
        **({"dpl_steps": 2, "dpl_lr": 0.05} if method == "dpl" else {}),
    )
    assert np.array_equal(np.asarray(result.image), np.asarray(result.reconstruction))
    assert result.blend_mask is None


def test_dpl_without_iterations_is_p2p(shapes_pipe, case):
    scene, image = case
    first = scene.objects[0]
    target = scene.caption.replace(f"a {first.colour} {first.shape}", f"a green {first.shape}", 1)
    options = dict(num_inference_steps=4, null_text_steps=2, guidance_scale=6.0)
    p2p = accel.edit(shapes_pipe, image, scene.caption, target, method="p2p", **options)
    dpl = accel.edit(shapes_pipe, image, scene.caption, target, method="dpl", dpl_steps=0, **options)
    assert np.array_equal(np.asarray(p2p.image), np.asarray(dpl.image))


def test_null_text_inversion_reconstructs_what_guided_ddim_inversion_loses(shapes_pipe, case):
    scene, image = case
    options = dict(method="p2p", num_inference_steps=8, guidance_scale=6.0, local_blend=False)
    plain = accel.edit(shapes_pipe, image, scene.caption, scene.caption, null_text_steps=0, **options)
    inverted = accel.edit(shapes_pipe, image, scene.caption, scene.caption, null_text_steps=10, **options)
    assert inverted.losses["null_text"][-1] < plain.losses["null_text"][-1] / 5
    error = [np.abs(np.asarray(r.reconstruction, np.float64) - image).mean() for r in (plain, inverted)]
    assert error[1] < error[0]


def test_recolouring_changes_the_object_more_than_the_rest(shapes_pipe, case):
    scene, image = case
    first = scene.objects[0]
    target = scene.caption.replace(f"a {first.colour} {first.shape}", f"a green {first.shape}", 1)
    result = accel.edit(
        shapes_pipe, image, scene.caption, target, method="p2p", num_inference_steps=10, guidance_scale=6.0
    )
    assert result.blend_words == [first.shape, first.shape]
    change = np.abs(np.asarray(result.image, np.float64) - np.asarray(result.reconstruction, np.float64)).mean(-1)
    region = shapes.object_mask(first, image.shape[0])
    assert change[region].mean() > 2 * change[~region].mean()


def test_cross_attention_injection_gives_the_edit_row_the_source_maps_through_the_alignment(tokenizer):
    # Prompt-to-Prompt's core: while progress < cross_replace the edit row attends with the source row's maps
    # (moved through the word alignment; an added word keeps its own column), applied to the edit's own values.
    from accel.processors.dense import AttentionCall
    from accel.processors.editing import EditAttnProcessor, EditController
    from accel.processors.state import LatentLayout

    alignment = align_prompts(tokenizer, "a circle", "a red circle")
    tokens = tokenizer.model_max_length
    controller = EditController(
        layout=LatentLayout(grid=(4, 4)),
        mapper=alignment.mapper,
        keep_source=alignment.keep_source,
        cross_replace=0.5,
    )
    processor = EditAttnProcessor(controller, layer="layer")
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(4, 16, 2, 8, generator=generator)  # [uncond source, uncond edit, source, edit]
    key, value = (torch.randn(4, tokens, 2, 8, generator=generator) for _ in range(2))
    call = AttentionCall(kind="cross", visual_tokens=16, text_tokens=tokens)
    probs = torch.softmax(query.transpose(1, 2) @ key.transpose(1, 2).transpose(-1, -2) * 8**-0.5, dim=-1)
    own = (probs @ value.transpose(1, 2)).transpose(1, 2)
    injected_maps = editing.transfer_cross_attention(probs[2], probs[3], alignment.mapper, alignment.keep_source)
    # The added word ("red", token 2) keeps its own column; "circle" (2 -> 3) and the rest take the source's.
    assert torch.equal(injected_maps[..., 2], probs[3][..., 2])
    assert torch.allclose(injected_maps[..., 3], probs[2][..., 2])
    assert torch.allclose(injected_maps[..., 1], probs[2][..., 1])
    injected = (injected_maps @ value[3].transpose(0, 1)).transpose(0, 1)
    with torch.no_grad():
        with controller.editing(progress=0.25):
            early = processor.attend(query, key, value, None, call)
        with controller.editing(progress=0.5):
            late = processor.attend(query, key, value, None, call)
    assert torch.allclose(early[:3], own[:3], atol=1e-5)  # the source and unconditional rows are never changed
    assert torch.allclose(early[3], injected, atol=1e-5)
    assert (early[3] - own[3]).abs().max() > 1e-2  # the injection did change the edit row
    assert torch.allclose(late, own, atol=1e-5)  # past cross_replace the edit keeps its own maps


def test_cross_attention_injection_keeps_the_sources_layout_outside_the_edit(shapes_pipe, case):
    # Without the local blend only the injection ties the edit to the source: turning it off (cross_replace=0)
    # lets the edit drift away from the reconstruction outside the recoloured object.
    scene, image = case
    first = scene.objects[0]
    target = scene.caption.replace(f"a {first.colour} {first.shape}", f"a green {first.shape}", 1)
    region = shapes.object_mask(first, image.shape[0])
    outside = {}
    for cross_replace in (0.8, 0.0):
        result = accel.edit(
            shapes_pipe,
            image,
            scene.caption,
            target,
            method="p2p",
            num_inference_steps=10,
            null_text_steps=1,
            guidance_scale=6.0,
            local_blend=False,
            cross_replace=cross_replace,
        )
        change = np.abs(np.asarray(result.image, np.float64) - np.asarray(result.reconstruction, np.float64)).mean(-1)
        outside[cross_replace] = change[~region].mean()
    assert outside[0.8] < 0.5 * outside[0.0]


def test_self_attention_injection_gives_the_edit_row_the_source_rows_attention():
    # Prompt-to-Prompt's self-attention injection: early on, the edit row attends with the source row's query and
    # keys (its probabilities), applied to the edit's own values; late, or at a level too large, it keeps its own.
    from accel.processors.dense import AttentionCall
    from accel.processors.editing import EditAttnProcessor, EditController
    from accel.processors.state import LatentLayout

    controller = EditController(layout=LatentLayout(grid=(4, 4)), self_replace=0.5, self_replace_side=4)
    processor = EditAttnProcessor(controller, layer="layer")
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(4, 16, 2, 8, generator=generator) for _ in range(3))
    call = AttentionCall(kind="self", visual_tokens=16, text_tokens=0)
    probs = torch.softmax(query.transpose(1, 2) @ key.transpose(1, 2).transpose(-1, -2) * 8**-0.5, dim=-1)
    own = (probs @ value.transpose(1, 2)).transpose(1, 2)
    injected = (probs[2] @ value[3].transpose(0, 1)).transpose(0, 1)
    with torch.no_grad():
        with controller.editing(progress=0.25):
            early = processor.attend(query, key, value, None, call)
        with controller.editing(progress=0.5):
            late = processor.attend(query, key, value, None, call)
        controller.self_replace_side = 3
        with controller.editing(progress=0.25):
            too_large = processor.attend(query, key, value, None, call)
    assert torch.allclose(early[:3], own[:3], atol=1e-5)
    assert torch.allclose(early[3], injected, atol=1e-5)
    assert (early[3] - own[3]).abs().max() > 1e-2
    assert torch.allclose(late, own, atol=1e-5) and torch.allclose(too_large, own, atol=1e-5)


def test_dpl_clusters_half_the_latent_and_at_most_32_a_side():
    from accel.pipelines.editing import self_attention_grid

    assert self_attention_grid((64, 64)) == (32, 32)  # DPL's own: 512² images
    assert self_attention_grid((16, 16)) == (8, 8)  # shapes-sd's 64 px
    assert self_attention_grid((128, 96)) == (32, 24)  # 1024 x 768: a level further down
    assert self_attention_grid((256, 256)) == (32, 32)
    assert self_attention_grid((512, 512)) == (64, 64)  # no deeper than the UNet's third halving


def test_dpl_learning_lowers_its_loss_and_finds_a_background(shapes_pipe, case, monkeypatch):
    scene, image = case
    # The nouns' mean maps of the inversion, as the background is computed from them.
    noun_maps = []
    find_background = editing.background_from_clusters

    def recording(labels, grid, word_maps_mean, *args, **kwargs):
        noun_maps.append(word_maps_mean.detach().cpu())
        return find_background(labels, grid, word_maps_mean, *args, **kwargs)

    monkeypatch.setattr(editing, "background_from_clusters", recording)
    # Self-attention is summed for k-means during the inversion only: (before, after) clustering.
    from accel.processors.editing import EditAttnProcessor

    self_records, own_self = [0, 0], EditAttnProcessor._self

    def counted_self(processor, query, key, value, attention_mask, grid, call):
        controller = processor.controller
        if controller.mode == "record" and grid == controller.self_grid:
            self_records[1 if noun_maps else 0] += 1
        return own_self(processor, query, key, value, attention_mask, grid, call)

    monkeypatch.setattr(EditAttnProcessor, "_self", counted_self)
    result = accel.edit(
        shapes_pipe,
        image,
        scene.caption,
        scene.caption,
        method="dpl",
        num_inference_steps=4,
        dpl_steps=5,
        null_text_steps=2,
        guidance_scale=6.0,
        dpl_lr=0.05,
    )
    assert self_records[0] > 0 and self_records[1] == 0
    assert result.dynamic_words == [o.shape for o in scene.objects]
    first, last = np.array(result.losses["dpl_first"]), np.array(result.losses["dpl_last"])
    assert len(first) == 4 and last[0] < first[0] and (last <= first + 1e-6).all()
    background = result.background
    assert background is not None and background.ndim == 2
    # A real partial mask: an empty one would switch DPL's leakage loss off, a full one would hold the objects too.
    assert 0 < background.mean() < 1
    # The background is the clusters no noun claims: where the nouns' (min-max normalised) maps are low. shapes-sd's
    # maps keep a floor everywhere and two nouns may share one object, so each noun's map is compared over the
    # background and elsewhere (as the code claims clusters), not against the scene's pixels.
    (maps,) = noun_maps
    assert tuple(maps.shape[-2:]) == background.shape
    flat = maps.flatten(1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    normalised = ((flat - low) / (high - low)).view(-1, *background.shape).numpy()
    inside = background.astype(bool)
    for noun in normalised:
        assert noun[inside].mean() < 0.8 * noun[~inside].mean()


@pytest.mark.parametrize("map_side", [8, 16])
def test_dpl_learning_passes_stopped_after_the_read_level_learn_the_same_tokens(
    shapes_pipe, case, monkeypatch, map_side
):
    from accel.processors.editing import EditAttnProcessor, EditController

    scene, image = case
    first = scene.objects[0]
    target = scene.caption.replace(f"a {first.colour} {first.shape}", f"a green {first.shape}", 1)
    options = dict(num_inference_steps=3, null_text_steps=1, dpl_steps=3, dpl_lr=0.05, map_side=map_side)
    own_cross, cross_calls = EditAttnProcessor._cross, []

    def counted_cross(processor, *args):
        if processor.controller.mode == "record":
            cross_calls[-1] += 1
        return own_cross(processor, *args)

    monkeypatch.setattr(EditAttnProcessor, "_cross", counted_cross)
    results = {}
    for stop in (False, True):
        monkeypatch.setattr(EditController, "stop_passes_early", stop)
        cross_calls.append(0)
        results[stop] = accel.edit(shapes_pipe, image, scene.caption, target, method="dpl", **options)
    whole, stopped = results[False], results[True]
    assert np.array_equal(np.asarray(whole.image), np.asarray(stopped.image))
    assert whole.losses == stopped.losses
    # shapes-sd's 16x16 latent: its 16x16 maps are the top level, whose last layer ends the UNet; at 8x8 the top up
    # block is skipped.
    assert (cross_calls[1] < cross_calls[0]) == (map_side == 8)


@pytest.mark.parametrize("method", ["p2p", "dpl"])
def test_edit_leaves_no_gradients_and_runs_under_no_grad(shapes_pipe, case, method):
    # Inversion and DPL differentiate through the UNet and text encoder; the user's models must not gather
    # gradients, and a caller's no_grad / inference_mode must not break the edit.
    scene, image = case
    target = scene.caption.replace(scene.objects[0].colour, "green", 1)
    options = dict(method=method, num_inference_steps=2, null_text_steps=2, guidance_scale=6.0)
    if method == "dpl":
        options.update(dpl_steps=2, dpl_lr=0.05)
    plain = accel.edit(shapes_pipe, image, scene.caption, target, **options)
    models = (shapes_pipe.unet, shapes_pipe.text_encoder)
    assert not [name for model in models for name, p in model.named_parameters() if p.grad is not None]
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            result = accel.edit(shapes_pipe, image, scene.caption, target, **options)
        assert np.array_equal(np.asarray(result.image), np.asarray(plain.image))


def test_edit_restores_processors_even_on_error(shapes_pipe, case, monkeypatch):
    from accel.pipelines import editing as editing_pipeline

    scene, image = case
    before = shapes_pipe.unet.attn_processors

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(editing_pipeline, "_edit", broken)
    with pytest.raises(RuntimeError, match="boom"):
        accel.edit(shapes_pipe, image, scene.caption, scene.caption)
    after = shapes_pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_bad_input_is_refused_with_the_fix(shapes_pipe, case, tiny_pipelines):
    scene, image = case
    with pytest.raises(accel.InvalidOptionError, match="in neither prompt; source words: 'a', "):
        accel.edit(shapes_pipe, image, scene.caption, scene.caption, blend_words=["zebra"])
    with pytest.raises(accel.InvalidOptionError, match="not in the source prompt"):
        accel.edit(shapes_pipe, image, scene.caption, scene.caption, dynamic_words=["zebra"])
    with pytest.raises(accel.InvalidOptionError, match="reweighted word 'zebra' is not in the edit prompt"):
        accel.edit(shapes_pipe, image, scene.caption, scene.caption, reweight={"zebra": 2.0})
    with pytest.raises(accel.InvalidOptionError, match="divisible by 32.*resize it"):
        accel.edit(shapes_pipe, image[:48], scene.caption, scene.caption)
    # Sizes the image processor would round to its own multiple of 8 are refused too, quoting the size given.
    with pytest.raises(accel.InvalidOptionError, match="the image is 66x66; .*divisible by 32"):
        accel.edit(shapes_pipe, np.pad(image, ((1, 1), (1, 1), (0, 0))), scene.caption, scene.caption)
    with pytest.raises(accel.InvalidOptionError, match="cross_replace"):
        accel.EditConfig(cross_replace=1.5)
    with pytest.raises(accel.InvalidOptionError, match="method"):
        accel.EditConfig(method="pix2pix")
    with pytest.raises(accel.InvalidOptionError, match="map_side=0 must be a positive integer"):
        accel.EditConfig(map_side=0)
    with pytest.raises(accel.UnsupportedModelError, match="SDXL"):
        accel.edit(tiny_pipelines["sdxl-tiny"], image, scene.caption, scene.caption)
    with accel.patched(shapes_pipe, "dense"), pytest.raises(accel.InvalidOptionError, match="unpatch"):
        accel.edit(shapes_pipe, image, scene.caption, scene.caption)
    from diffusers.models.attention_processor import AttnProcessor2_0

    class CustomProcessor(AttnProcessor2_0):  # e.g. an adapter's: the edit must not silently drop it
        pass

    unet = shapes_pipe.unet
    originals = unet.attn_processors
    layer = next(name for name in originals if "attn2" in name)
    unet.set_attn_processor({**originals, layer: CustomProcessor()})
    try:
        with pytest.raises(accel.InvalidOptionError, match="uses CustomProcessor, whose behaviour"):
            accel.edit(shapes_pipe, image, scene.caption, scene.caption)
        assert type(unet.attn_processors[layer]) is CustomProcessor
    finally:
        unet.set_attn_processor(dict(originals))


def test_options_of_a_part_that_does_not_run_are_refused(shapes_pipe, case):
    scene, image = case
    with pytest.raises(accel.InvalidOptionError, match="dpl_lr=0.01 sets Dynamic Prompt Learning"):
        accel.edit(shapes_pipe, image, scene.caption, scene.caption, method="p2p", dpl_lr=0.01)
    with pytest.raises(accel.InvalidOptionError, match="blend_start=0.5 shapes the local blend"):
        accel.edit(shapes_pipe, image, scene.caption, scene.caption, local_blend=False, blend_start=0.5)


def test_unknown_option_names_the_closest(shapes_pipe, case):
    scene, image = case
    with pytest.raises(accel.InvalidOptionError, match="did you mean 'blend_words'"):
        accel.edit(shapes_pipe, image, scene.caption, scene.caption, blend_word=["circle"])


def test_cli_edit_writes_the_images(tmp_path, case):
    from PIL import Image

    from accel.cli import main

    scene, image = case
    Image.fromarray(image).save(tmp_path / "in.png")
    first = scene.objects[0]
    target = scene.caption.replace(f"a {first.colour} {first.shape}", f"a green {first.shape}", 1)
    code = main(
        [
            "edit",
            "--image",
            str(tmp_path / "in.png"),
            "--source",
            scene.caption,
            "--target",
            target,
            "--method",
            "p2p",
            "--steps",
            "3",
            "--option",
            "null_text_steps=1",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    edited = np.asarray(Image.open(tmp_path / "out" / "edited.png"), dtype=np.float64)
    reconstruction = np.asarray(Image.open(tmp_path / "out" / "reconstruction.png"), dtype=np.float64)
    assert edited.shape == (64, 64, 3) and np.abs(edited - reconstruction).max() > 10  # the edit changed something
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["target"] == target and record["blend_words"]


def test_maps_are_read_at_the_level_nearest_map_side():
    from accel.processors.editing import EditController
    from accel.processors.state import LatentLayout

    controller = EditController(layout=LatentLayout(grid=(16, 16)), map_side=8)
    tokens = 5
    for side in (16, 8, 4):
        controller.maps[f"level{side}"] = ((side, side), torch.full((1, side * side, tokens), float(side)))
        controller.blend_sums[(side, side)] = torch.full((2, side * side, tokens), float(side))
    assert controller.cross_maps().shape == (1, 8, 8, tokens) and (controller.cross_maps() == 8).all()
    assert controller.blend_maps().shape == (2, 8, 8, tokens) and (controller.blend_maps() == 8).all()
    controller.map_side = 16
    assert controller.cross_maps().shape == (1, 16, 16, tokens) and controller.blend_maps().shape[1:3] == (16, 16)


def test_images_of_any_mode_are_read_as_rgb_and_unusable_ones_refused(shapes_pipe, case):
    from PIL import Image

    from accel.pipelines.editing import image_latents

    scene, image = case
    rgb = image_latents(shapes_pipe, image)
    opaque = np.concatenate([image, np.full((*image.shape[:2], 1), 255, np.uint8)], axis=-1)
    grey = np.asarray(Image.fromarray(image).convert("L"))
    grey_rgb = image_latents(shapes_pipe, np.repeat(grey[..., None], 3, axis=-1))
    chw = torch.tensor(image).permute(2, 0, 1).float() / 255
    same_as_rgb = [
        Image.fromarray(image).convert("RGBA"),  # alpha dropped
        opaque,
        [Image.fromarray(image)],  # a list of one image
        image.astype(np.float32) / 255,
        image[None].astype(np.float32) / 255,
        chw,
        chw[None],
    ]
    for accepted in same_as_rgb:
        assert torch.allclose(image_latents(shapes_pipe, accepted), rgb, atol=1e-4)
    for accepted in (Image.fromarray(grey), grey, Image.fromarray(image).convert("P")):
        assert image_latents(shapes_pipe, accepted).shape == rgb.shape
    assert torch.equal(image_latents(shapes_pipe, Image.fromarray(grey)), grey_rgb)
    assert torch.equal(image_latents(shapes_pipe, grey), grey_rgb)

    # Refused before any denoising, with what is accepted; the RGBA image above also runs end to end.
    refused = {
        "got a list of 2 images": [Image.fromarray(image)] * 2,
        "got a batch of 2": np.stack([image, image]),
        r"not channels-first RGB .*tensor.permute\(2, 0, 1\)": torch.tensor(image).float() / 255,
        r"spans \[\d+, \d+\] \(values up to 255 are 8-bit ones: divide by 255": image.astype(np.float32),
        r"values in \[-1, 1\]: pass \(image \+ 1\) / 2": chw * 2 - 1,
        "dtype torch.uint8 must be float": torch.tensor(image).permute(2, 0, 1),
        "dtype int64 is neither uint8": image.astype(np.int64),
        r"not a channels-last image .*transpose\(1, 2, 0\)": image.transpose(2, 0, 1).copy(),
        "the image is a str": "in.png",
    }
    for message, bad in refused.items():
        with pytest.raises(accel.InvalidOptionError, match=f"{message}.*PIL image \\(any 8-bit mode; alpha"):
            accel.edit(shapes_pipe, bad, scene.caption, scene.caption)
    result = accel.edit(
        shapes_pipe,
        Image.fromarray(opaque, "RGBA"),
        scene.caption,
        scene.caption,
        method="p2p",
        num_inference_steps=2,
        null_text_steps=1,
        local_blend=False,
    )
    assert np.asarray(result.image).shape == image.shape


def test_a_change_past_the_token_limit_is_refused_not_reconstructed(shapes_pipe, case, tokenizer):
    from accel.pipelines.editing import _check_change_is_encoded
    from accel.pipelines.prompts import prompt_words

    scene, image = case
    # shapes-sd's tokenizer reads 16 tokens: BOS, 14 one-token words, EOS.
    source = "a red circle and a blue square and a green star and a red circle"
    target = "a red circle and a blue square and a green star and a red square"
    message = r"reads 16 tokens, 14 of them for words.*first 14 words.*\('circle' -> 'square'\) is word 15"
    with pytest.raises(accel.InvalidOptionError, match=message):
        accel.edit(shapes_pipe, image, source, target)
    with pytest.raises(accel.InvalidOptionError, match=r"\(adds 'and'\) is word 16"):
        accel.edit(shapes_pipe, image, source, source + " and a green star", local_blend=False)
    # Still edits: a change within the limit (one past it is dropped, with a warning), and same-word prompts.
    for other in (target.replace("green", "blue"), source.upper() + ".", source):
        words = prompt_words(tokenizer, source)
        _check_change_is_encoded(tokenizer, source, other, words, align_prompts(tokenizer, source, other))


def test_the_part_of_an_edit_past_the_token_limit_is_named(tokenizer, caplog):
    from accel.pipelines.editing import _warn_of_changes_past_the_limit
    from accel.pipelines.prompts import prompt_words

    source = "a red circle and a blue square and a green star and a red circle"
    words = prompt_words(tokenizer, source)
    both = "a red circle and a blue square and a blue star and a red square"
    with caplog.at_level("WARNING", logger="accel.pipelines.editing"):
        _warn_of_changes_past_the_limit(tokenizer, source, both, words, prompt_words(tokenizer, both))
    assert "first 14 words of the source prompt and 14 of the edit prompt" in caplog.text
    assert "not made: 'circle' -> 'square'" in caplog.text and "green" not in caplog.text
    caplog.clear()
    # A word added within the limit pushes a shared word of the edit prompt past it: the edit would remove it.
    added = source.replace("a blue square", "a big blue square")
    with caplog.at_level("WARNING", logger="accel.pipelines.editing"):
        _warn_of_changes_past_the_limit(tokenizer, source, added, words, prompt_words(tokenizer, added))
    assert "the edit removes 'red', which the edit prompt pushes past them" in caplog.text
    assert "not made" not in caplog.text
    caplog.clear()
    # The other way: a word dropped within the limit brings a shared word of the source's tail into the edit prompt.
    with caplog.at_level("WARNING", logger="accel.pipelines.editing"):
        _warn_of_changes_past_the_limit(tokenizer, added, source, prompt_words(tokenizer, added), words)
    assert "the edit adds 'red', which the source prompt holds only past them" in caplog.text
    caplog.clear()
    # Within the limit, no word moves across it: nothing to say.
    swapped = source.replace("green", "blue")
    with caplog.at_level("WARNING", logger="accel.pipelines.editing"):
        _warn_of_changes_past_the_limit(tokenizer, source, swapped, words, prompt_words(tokenizer, swapped))
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("source", "target", "blend"),
    [
        ("a red circle", "a red circle next to a blue square", ([], ["square"])),
        ("a red circle and a blue square", "a red circle", (["square"], [])),
        ("a red circle left of a blue square", "a red circle right of a blue square", (["left"], ["right"])),
        ("two red circles of stars", "two red circles of squares", (["stars"], ["squares"])),
    ],
)
def test_default_blend_words_leave_out_connectors_of_a_changed_phrase(tokenizer, source, target, blend):
    from accel.pipelines.editing import _blend_words
    from accel.pipelines.prompts import prompt_words

    words = [prompt_words(tokenizer, p) for p in (source, target)]
    chosen = _blend_words(source, target, *words, align_prompts(tokenizer, source, target), accel.EditConfig())
    assert tuple([w[i].text for i in c] for w, c in zip(words, chosen, strict=True)) == blend


def test_added_phrase_blends_on_its_noun_not_its_conjunction(shapes_pipe, case):
    scene, image = case
    first, second = scene.objects
    result = accel.edit(
        shapes_pipe,
        image,
        f"a {first.colour} {first.shape}",
        scene.caption,  # "... and a <colour> <shape>": "and" used to blend too
        method="p2p",
        num_inference_steps=2,
        null_text_steps=1,
    )
    assert result.blend_words == [second.shape]


def test_memory_saving_processors_are_stood_in_for_and_given_back(shapes_pipe, case):
    scene, image = case
    shapes_pipe.enable_attention_slicing()
    try:
        sliced = {name: type(p).__name__ for name, p in shapes_pipe.unet.attn_processors.items()}
        result = accel.edit(
            shapes_pipe, image, scene.caption, scene.caption, method="p2p", num_inference_steps=2, null_text_steps=1
        )
        assert result.image.size == (64, 64)
        assert {name: type(p).__name__ for name, p in shapes_pipe.unet.attn_processors.items()} == sliced
        assert set(sliced.values()) == {"SlicedAttnProcessor"}
    finally:
        shapes_pipe.disable_attention_slicing()
