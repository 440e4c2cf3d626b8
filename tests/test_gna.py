"""GNA on FLUX and HunyuanVideo pipelines: exact where it must be, a measured change where it is not, clean errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import generate, model_fingerprint

import accel
from accel.errors import InvalidOptionError, UnsupportedModelError
from accel.kernels.neighborhood import Neighborhood, default_tile, tile_plan
from accel.pipelines.gna import flux_default_geometry, hunyuanvideo_default_geometry
from accel.processors.gna import _NeighborhoodAttend

FAMILIES = ("flux-tiny", "hunyuanvideo-tiny")
# Small enough to be sparse on the tiny pipelines' grids (FLUX 8x8 image tokens, HunyuanVideo 3x8x8 video tokens).
SPARSE = {"flux-tiny": dict(kernel_size=3, stride=1), "hunyuanvideo-tiny": dict(kernel_size=(2, 5, 5), stride=1)}


def _name(request) -> str:
    return request.node.callspec.params["pipeline"]


@pytest.mark.parametrize("pipeline", FAMILIES, indirect=True)
def test_window_covering_the_grid_equals_dense_and_unpatch_restores(pipeline, request, monkeypatch):
    name = _name(request)
    reference = generate(pipeline, name)
    before = model_fingerprint(pipeline.transformer)
    # A kernel as large as the grid is dense attention; disabling the shortcut sends it through the GNA path
    # (text/visual split, text keys, padded-text mask, reassembly), which must then reproduce dense attention.
    monkeypatch.setattr(Neighborhood, "is_dense", property(lambda self: False))
    accel.patch(pipeline, "gna", kernel_size=10_000, backend="torch")
    with pytest.raises(ValueError, match="kernel_size 10000 is larger than the token grid"):
        generate(pipeline, name)
    grid = _recorded_grid(pipeline, name)
    accel.patch(pipeline, "gna", kernel_size=grid, backend="torch")
    assert np.abs(generate(pipeline, name) - reference).max() <= 1e-5
    accel.unpatch(pipeline)
    assert model_fingerprint(pipeline.transformer) == before
    assert np.array_equal(generate(pipeline, name), reference)


def _recorded_grid(pipe, name) -> tuple[int, ...]:
    """The token grid the step hook records for the tiny pipeline's default size."""
    grids = []
    with accel.patched(pipe, "dense"):
        context = accel.get_patch(pipe).context
        first_block = pipe.transformer.transformer_blocks[0]
        hook = first_block.register_forward_pre_hook(lambda module, args: grids.append(context.layout.grid))
        try:
            generate(pipe, name, steps=1)
        finally:
            hook.remove()
    return grids[0]


@pytest.mark.parametrize("pipeline", FAMILIES, indirect=True)
def test_small_windows_change_the_result_and_the_torch_path_equals_the_reference(pipeline, request):
    name = _name(request)
    dense = generate(pipeline, name)
    with accel.patched(pipeline, "gna", backend="reference", **SPARSE[name]):
        truth = generate(pipeline, name)
    with accel.patched(pipeline, "gna", backend="torch", **SPARSE[name]):
        tiled = generate(pipeline, name)
    assert np.abs(tiled - truth).max() <= 1e-4
    assert np.abs(truth - dense).max() > 1e-3


@pytest.mark.parametrize(("method", "options"), [("gna", SPARSE["flux-tiny"]), ("vmoba", {"blocks": [(4, 4)]})])
def test_the_reference_backend_refuses_sizes_whose_scores_would_not_fit(tiny_pipelines, method, options, monkeypatch):
    import accel.processors.joint as joint

    pipe = tiny_pipelines["flux-tiny"]
    # flux-tiny's 8 x 8 image tokens: 1 x heads x 64 x (64 + text) scores; a limit below that stands in for 2048².
    monkeypatch.setattr(joint, "REFERENCE_BYTES_LIMIT", 64 * 64 * 5)
    with accel.patched(pipe, method, backend="reference", **options):
        with pytest.raises(ValueError, match=f"{method}: backend='reference' would write out .* use backend='torch'"):
            generate(pipe, "flux-tiny", steps=1)


def test_triton_kernel_in_the_flux_pipeline(tiny_pipelines):
    from accel.kernels.block_sparse import triton_usable

    pipe = tiny_pipelines["flux-tiny"]
    if not triton_usable("cpu"):
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    with accel.patched(pipe, "gna", backend="torch", **SPARSE["flux-tiny"]):
        tiled = generate(pipe, "flux-tiny", steps=1)
    with accel.patched(pipe, "gna", backend="triton", **SPARSE["flux-tiny"]):
        fused = generate(pipe, "flux-tiny", steps=1)
    assert np.abs(fused - tiled).max() <= 1e-4


@pytest.mark.parametrize("pipeline", ["flux-tiny"], indirect=True)
def test_dense_steps_and_dense_layers(pipeline):
    dense = generate(pipeline, "flux-tiny", steps=2)
    with accel.patched(pipeline, "gna", dense_steps=2, **SPARSE["flux-tiny"]):
        assert np.array_equal(generate(pipeline, "flux-tiny", steps=2), dense)
    with accel.patched(pipeline, "gna", **SPARSE["flux-tiny"]):
        sparse_all = generate(pipeline, "flux-tiny", steps=2)
    with accel.patched(pipeline, "gna", dense_steps=1, **SPARSE["flux-tiny"]):
        sparse_late = generate(pipeline, "flux-tiny", steps=2)
    assert np.abs(sparse_late - dense).max() > 1e-4 and np.abs(sparse_late - sparse_all).max() > 1e-4
    handle = accel.patch(pipeline, "gna", dense_layers=r"single_transformer_blocks\..*", **SPARSE["flux-tiny"])
    assert handle.layers and all(name.startswith("transformer_blocks.") for name in handle.layers)


@pytest.mark.parametrize("pipeline", ["flux-tiny"], indirect=True)
def test_per_layer_geometry(pipeline):
    accel.patch(pipeline, "gna", kernel_size=3, per_layer={r"transformer_blocks\.0\..*": {"kernel_size": 5}})
    processors = {
        name: p for name, p in pipeline.transformer.attn_processors.items() if isinstance(p, _NeighborhoodAttend)
    }
    kernels = {name.rsplit(".processor", 1)[0]: p.settings.kernel_size for name, p in processors.items()}
    assert kernels["transformer_blocks.0.attn"] == 5
    assert {k for name, k in kernels.items() if name != "transformer_blocks.0.attn"} == {3}


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(kernel_size=0), "positive int"),
        (dict(stride=(2, "a")), "positive int"),
        (dict(is_causal="yes"), "bool"),
        (dict(dense_steps=-1), "non-negative"),
        (dict(backend="cuda"), "one of auto, torch, triton, reference"),
        (dict(per_layer={"transformer_blocks.*": {"window": 3}}), "must be a dict of kernel_size"),
        (dict(per_layer={"nothing-matches": {"kernel_size": 3}}), "matches none of the patched layers"),
        (dict(dense_layers="nothing-matches"), "matches none of the layers"),
        (dict(dense_layers=".*"), "matches every layer it patches, so nothing would be sparse"),
        (dict(dense_layers="("), "not a valid regex"),
        (dict(kernel_sise=3), "Did you mean 'kernel_size'"),
        (dict(kernel_size=(3, 3, 3)), "has 3 entries but flux token grids have 2 axes"),
        (dict(is_causal=(True, False, False)), "has 3 entries but flux token grids have 2 axes"),
        (dict(per_layer={".*": {"kernel_size": "x"}}), r"per_layer\['\.\*'\]: kernel_size='x' must be a positive int"),
    ],
)
def test_bad_configs_are_refused(tiny_pipelines, options, words):
    pipe = tiny_pipelines["flux-tiny"]
    before = model_fingerprint(pipe.transformer)
    with pytest.raises(InvalidOptionError, match=words):
        accel.patch(pipe, "gna", **options)
    assert model_fingerprint(pipe.transformer) == before


@pytest.mark.parametrize("pipeline", ["flux-tiny"], indirect=True)
def test_an_explicit_stride_widens_the_default_window(pipeline):
    # flux-tiny at 128 px: 8x8 image tokens, default window 3x3 (5/16 of a side). Stride 4 needs a window of 4; a
    # stride past the grid is one group per axis, i.e. the whole grid and so dense.
    processors = []
    with accel.patched(pipeline, "gna", stride=4) as handle:
        strided = generate(pipeline, "flux-tiny", steps=1)
        processors = [p for p in pipeline.transformer.attn_processors.values() if isinstance(p, _NeighborhoodAttend)]
        assert handle.active
    neighborhood = processors[0]._neighborhoods[(8, 8)]
    assert tuple(neighborhood.kernel_size) == (4, 4) and tuple(neighborhood.stride) == (4, 4)
    dense = generate(pipeline, "flux-tiny", steps=1)
    assert not np.array_equal(strided, dense)
    with accel.patched(pipeline, "gna", stride=16):
        assert np.array_equal(generate(pipeline, "flux-tiny", steps=1), dense)
    # A widened window that its dilation cannot fit names the stride and dilation given, not a kernel never set.
    with accel.patched(pipeline, "gna", stride=8, dilation=2):
        with pytest.raises(ValueError, match="stride 8 needs a window of at least 8, which dilated by 2 spans 16"):
            generate(pipeline, "flux-tiny", steps=1)


@pytest.mark.parametrize("pipeline", ["flux-tiny"], indirect=True)
def test_geometry_errors_name_the_grid_at_call_time(pipeline):
    accel.patch(pipeline, "gna", kernel_size=4, stride=5)
    with pytest.raises(ValueError, match=r"gna: .* at token grid \(8, 8\): stride 5 is larger than kernel_size 4"):
        generate(pipeline, "flux-tiny", steps=1)


def test_unets_are_refused(tiny_pipelines):
    with pytest.raises(UnsupportedModelError, match="gna"):
        accel.patch(tiny_pipelines["sd15-tiny"], "gna")


def test_default_geometry_reproduces_the_papers_4k_settings():
    assert flux_default_geometry((256, 256)) == ((80, 80), (16, 16))
    assert hunyuanvideo_default_geometry((30, 48, 80)) == ((18, 24, 24), (16, 8, 8))
    kernel, stride = flux_default_geometry((3, 40))
    assert Neighborhood.create((3, 40), kernel, stride)  # valid on small and uneven grids too


@pytest.mark.parametrize(
    "geometry, grid",
    [
        (flux_default_geometry, (128, 128)),
        (flux_default_geometry, (64, 96)),
        (hunyuanvideo_default_geometry, (8, 32, 64)),
        (hunyuanvideo_default_geometry, (30, 48, 80)),
    ],
)
def test_default_geometry_is_block_sparse_for_the_cpu_tiles(geometry, grid):
    # The paper's strides kept at every size: every CPU tile is whole stride groups sharing one window, so no tile
    # needs a mask (the proportional strides used before left masks in the tiles, which ran about 3x slower).
    hood = Neighborhood.create(grid, *geometry(grid))
    tile = default_tile(hood)
    plan = tile_plan(hood.grid, hood.kernel_size, hood.stride, hood.is_causal, tile, torch.device("cpu"))
    assert tile == hood.stride and all(inside is None for inside in plan.inside)


@pytest.mark.parametrize("method", ["gna", "vmoba", "agent"])
def test_pipelines_that_append_image_tokens_are_refused(tiny_pipelines, method):
    from diffusers import FluxKontextPipeline

    kontext = FluxKontextPipeline(**tiny_pipelines["flux-tiny"].components)
    with pytest.raises(UnsupportedModelError, match=f"{method}: FluxKontextPipeline appends the reference image"):
        accel.patch(kontext, method)
    assert accel.get_patch(kontext) is None


@pytest.mark.parametrize("pipeline", ["flux-tiny"], indirect=True)
def test_per_layer_values_from_json_lists_act_as_tuples(pipeline):
    from accel.cli import parse_options

    # The overrides must differ from flux-tiny's default geometry on its 8x8 grid (3x3 window, stride 3): with the
    # default's own values, an override that is dropped would give the same result and the test could not fail.
    assert flux_default_geometry((8, 8)) == ((3, 3), (3, 3))
    with accel.patched(pipeline, "gna", backend="torch"):
        default = generate(pipeline, "flux-tiny")
    options = parse_options(
        ['per_layer={".*": {"kernel_size": [5, 5], "stride": [1, 1], "is_causal": [false, false]}}']
    )
    with accel.patched(pipeline, "gna", backend="torch", **options):
        from_json = generate(pipeline, "flux-tiny")
        processors = [p for p in pipeline.transformer.attn_processors.values() if isinstance(p, _NeighborhoodAttend)]
        assert processors and all(p.settings.kernel_size == (5, 5) for p in processors)
        assert all(p.settings.stride == (1, 1) for p in processors)
        neighborhood = processors[0]._neighborhoods[(8, 8)]
        assert tuple(neighborhood.kernel_size) == (5, 5) and tuple(neighborhood.stride) == (1, 1)
    with accel.patched(pipeline, "gna", backend="torch", kernel_size=(5, 5), stride=(1, 1), is_causal=(False, False)):
        as_tuples = generate(pipeline, "flux-tiny")
    assert np.array_equal(from_json, as_tuples)
    assert np.abs(from_json - default).max() > 1e-4
