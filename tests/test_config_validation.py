"""Config validation: nothing a user passes is silently ignored or misread; each refusal names the option and the fix."""

from __future__ import annotations

import re

import pytest

import accel
from accel import InvalidOptionError
from accel.config import AgentConfig, AStarConfig, EditConfig, HiDiffusionConfig, VMoBAConfig

INF, NAN = float("inf"), float("nan")


def _refused_and_untouched(pipe, method: str, options: dict, words: str) -> None:
    with pytest.raises(InvalidOptionError) as error:
        accel.patch(pipe, method, **options)
    assert words in str(error.value)
    assert accel.get_patch(pipe) is None


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: AStarConfig(step_size=INF), "step_size=inf must be a non-negative finite"),
        (lambda: AStarConfig(sharpness=INF), "sharpness=inf must be a positive finite"),
        (lambda: AStarConfig(sharpness=NAN), "sharpness=nan must be a positive finite"),
        (lambda: AgentConfig(shortcut=NAN), "shortcut=nan must be a finite"),
        (lambda: AgentConfig(scale_exponent=INF), "scale_exponent=inf must be a positive finite"),
        (lambda: EditConfig(guidance_scale=NAN), "guidance_scale=nan must be a non-negative finite"),
        (lambda: EditConfig(reweight={"green": INF}), "reweight="),
        (lambda: EditConfig(dpl_weights=(1.0, NAN, 0.05)), "must be three non-negative finite"),
        (lambda: VMoBAConfig(threshold=NAN), "threshold=nan"),
    ],
)
def test_non_finite_numbers_are_refused(build, words):
    with pytest.raises(InvalidOptionError) as error:
        build()
    assert words in str(error.value)


def test_non_finite_numbers_leave_the_model_unpatched(tiny_pipelines):
    _refused_and_untouched(tiny_pipelines["sd15-tiny"], "agent", {"shortcut": NAN}, "shortcut=nan must be a finite")
    _refused_and_untouched(
        tiny_pipelines["sd15-tiny"], "astar", {"step_size": INF}, "step_size=inf must be a non-negative finite"
    )


@pytest.mark.parametrize(
    ("options", "words"),
    [
        # "no" is truthy: accepted, it would have turned the part on.
        ({"raunet": "no"}, "raunet='no' must be True or False"),
        ({"mswmsa": "no"}, "mswmsa='no' must be True or False"),
        ({"raunet": 0}, "raunet=0 must be True or False"),
        # bool is an int to Python: windows=True read as one window per axis.
        ({"windows": True}, "windows=True must be a positive int"),
        ({"window_size": (8, False)}, "window_size=(8, False) must be a positive int"),
        ({"shift_seed": True}, "shift_seed must be an int, got True"),
        ({"raunet_switch": True}, "raunet_switch=True must be a fraction"),
    ],
)
def test_hidiffusion_bools_and_ints_are_not_confused(tiny_pipelines, options, words):
    _refused_and_untouched(tiny_pipelines["sd15-tiny"], "hidiffusion", options, words)


def test_bools_elsewhere_must_be_bools():
    with pytest.raises(InvalidOptionError, match="local_blend='no' must be True or False"):
        EditConfig(local_blend="no")
    with pytest.raises(InvalidOptionError, match="config version True"):
        HiDiffusionConfig(version=True)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"raunet": False, "raunet_switch": 0.5}, "raunet_switch=0.5 sets RAU-Net's schedule"),
        ({"raunet": False, "raunet_deep_switch": 0.3}, "drop raunet_deep_switch or turn raunet on"),
        ({"mswmsa": False, "windows": 4}, "windows=(4, 4) shapes MSW-MSA's windows"),
        # Set explicitly, even to its default, an option counts as asked for.
        ({"mswmsa": False, "windows": 2}, "drop windows or turn mswmsa on"),
        ({"mswmsa": False, "window_size": 8}, "drop window_size or turn mswmsa on"),
        ({"mswmsa": False, "shift": "none"}, "drop shift or turn mswmsa on"),
        ({"mswmsa": False, "shift_seed": 3}, "drop shift_seed or turn mswmsa on"),
        ({"windows": 4, "window_size": 8}, "both set the windows; give only one of them"),
        ({"windows": 2, "window_size": 8}, "both set the windows; give only one of them"),
        ({"shift": "none", "shift_seed": 3}, "which shift='none' turns off"),
        ({"shift": "none", "shift_seed": 0}, "drop shift_seed or use shift='random'"),
    ],
)
def test_hidiffusion_contradictions_are_refused(tiny_pipelines, options, words):
    _refused_and_untouched(tiny_pipelines["sd15-tiny"], "hidiffusion", options, words)


def test_hidiffusion_single_switches_and_replace_still_work():
    assert HiDiffusionConfig(raunet=False).windows == (2, 2)
    assert HiDiffusionConfig(mswmsa=False, raunet_switch=0.5).raunet_switch == 0.5
    assert HiDiffusionConfig(raunet_switch=None, raunet=False).raunet is False  # None is the default: not "set"
    # replace carries over only what was set, so a default never collides with the new option.
    assert HiDiffusionConfig().replace(window_size=8).window_size == (8, 8)
    kept = HiDiffusionConfig(shift_seed=3).replace(windows=4)
    assert (kept.shift_seed, kept.windows) == (3, (4, 4))
    with pytest.raises(InvalidOptionError, match="give only one of them"):
        HiDiffusionConfig(windows=4).replace(window_size=8)


def test_astar_threshold_is_refused_with_attend_excite(tiny_pipelines):
    _refused_and_untouched(
        tiny_pipelines["sd15-tiny"],
        "astar",
        {"loss": "attend_excite", "threshold": 0.5},
        "loss='attend_excite' does not use: drop threshold or use loss='astar'",
    )
    assert AStarConfig(loss="attend_excite").threshold == 0.7
    assert AStarConfig(loss="astar", threshold=0.5).threshold == 0.5


def test_astar_refinement_needs_attend_and_excites_loss(tiny_pipelines):
    _refused_and_untouched(
        tiny_pipelines["sd15-tiny"], "astar", {"refine": True}, "refine=True repeats updates until A&E's loss"
    )
    with pytest.raises(InvalidOptionError, match="refine='yes' must be True, False or None"):
        AStarConfig(loss="attend_excite", refine="yes")
    assert AStarConfig(loss="attend_excite", refine=False).refine is False


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"noun_phrases": []}, "noun_phrases=[] must be a list of phrases, at least one"),
        ({"noun_phrases": ["a red circle"], "parser": "builtin"}, "drop parser or noun_phrases"),
        ({"noun_phrases": ["a red circle"], "parser": "auto"}, "the parser would not run"),
    ],
)
def test_structured_phrases_are_not_dropped_or_ignored(tiny_pipelines, options, words):
    _refused_and_untouched(tiny_pipelines["sd15-tiny"], "structured", options, words)


def test_vmoba_threshold_one_with_blocks_is_the_documented_dense_switch():
    # Every block kept is dense attention whatever the partition, so blocks are not lost: nothing to refuse.
    assert VMoBAConfig(threshold=1, blocks=[(2, None, None)]).blocks == [(2, None, None)]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"dpl_weights": 1}, "dpl_weights=1 must be three non-negative finite numbers"),
        ({"dpl_targets": 0.5}, "dpl_targets=0.5 must be three"),
        ({"blend_words": 5}, "blend_words=5 must be a non-empty list of words"),
    ],
)
def test_edit_non_sequences_are_invalid_options_not_type_errors(options, words):
    with pytest.raises(InvalidOptionError) as error:
        EditConfig(**options)
    assert words in str(error.value)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"method": "p2p", "seed": 3}, "seed=3 sets Dynamic Prompt Learning, which method='p2p' does not run"),
        ({"reweight": {"green": 2.0}, "cross_replace": 0}, "cross_replace=0 injects none"),
        ({"null_text_steps": 0, "null_text_lr": 0.1}, "null_text_steps=0 does not run"),
        ({"dpl_steps": 0, "dpl_lr": 0.1}, "dpl_lr=0.1 shapes DPL's iterations, which dpl_steps=0 does not run"),
        ({"guidance_scale": 0}, "guidance_scale=0 must be at least 1"),
        ({"guidance_scale": 0.5}, "must be at least 1"),
    ],
)
def test_edit_options_that_would_do_nothing_are_refused(options, words):
    with pytest.raises(InvalidOptionError) as error:
        EditConfig(**options)
    assert words in str(error.value)
    # The same options where they act are accepted.
    EditConfig(guidance_scale=1.0, null_text_lr=0.1, dpl_lr=0.1, reweight={"green": 2.0}, seed=3)


def test_astar_non_sequence_tokens_are_invalid_options():
    with pytest.raises(InvalidOptionError, match="tokens=1.5 must be a non-empty list"):
        AStarConfig(tokens=1.5)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        # Merge pooling is the UNet default: it cannot make fewer agents than cells, explicit pooling or not.
        ({"agent_ratio": 0.01}, "pooling='merge' (the UNet default) makes at least one agent per 4x4 cell"),
        ({"cell": 2}, "raise it to ≥ 0.25, enlarge cell, or use pooling='grid'"),
    ],
)
def test_agent_ratio_below_one_agent_per_cell_is_refused_under_default_merge_pooling(tiny_pipelines, options, words):
    _refused_and_untouched(tiny_pipelines["sd15-tiny"], "agent", options, words)


def test_agent_ratio_takes_effect_where_merge_pooling_can_honour_it(tiny_pipelines):
    sd = tiny_pipelines["sd15-tiny"]
    for options in ({"agent_ratio": 1 / 8}, {"agent_ratio": 0.01, "pooling": "grid"}):
        with accel.patched(sd, "agent", **options):
            assert accel.get_patch(sd) is not None
    assert accel.get_patch(sd) is None


@pytest.mark.parametrize("model", ["flux-tiny", "hunyuanvideo-tiny"])
@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"cell": 2}, "cell=(2, 2) is for UNets"),
        ({"late_cell": 4}, "leave late_cell unset"),
        ({"seed": 3}, "seed=3 is for UNets"),
        ({"seed": None}, "leave seed unset"),
    ],
)
def test_agent_merging_options_are_refused_on_transformers(tiny_pipelines, model, options, words):
    _refused_and_untouched(tiny_pipelines[model], "agent", options, words)


@pytest.mark.parametrize(
    ("options", "unused"),
    [
        ({"pooling": "grid", "merge_ratio": 0, "late_merge_ratio": 0, "cell": 8}, "cell=(8, 8)"),
        ({"pooling": "grid", "merge_ratio": 0, "late_merge_ratio": 0, "seed": 3}, "seed=3"),
        ({"late_merge_ratio": 0, "late_cell": 4}, "late_cell=(4, 4)"),
    ],
)
def test_agent_merging_options_are_refused_on_unets_where_nothing_merges(tiny_pipelines, options, unused):
    pipe = tiny_pipelines["sd15-tiny"]
    with pytest.raises(InvalidOptionError, match=re.escape(unused) + " shapes token merging, which does not run"):
        accel.patch(pipe, "agent", **options)
    assert accel.get_patch(pipe) is None


@pytest.mark.parametrize(
    ("model", "method"), [("flux-tiny", "gna"), ("flux-tiny", "vmoba"), ("sd15-tiny", "hidiffusion")]
)
def test_triton_named_on_a_machine_without_cuda_is_refused_at_patch_time(tiny_pipelines, monkeypatch, model, method):
    # Outside the interpreter the kernel needs CUDA; the tests set TRITON_INTERPRET=1, so it is taken away here.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _refused_and_untouched(tiny_pipelines[model], method, {"backend": "triton"}, "this machine has no CUDA device")
