"""The cross-attention controls on SDXL (two text encoders, added conditioning): exact at zero strength, effective
otherwise, restored by unpatch, and refused when the two encoders would read different texts."""

import numpy as np
import pytest
from helpers import generate, model_fingerprint

import accel

PROMPT = "a red circle and a blue square"


@pytest.mark.parametrize("pipeline", ["sdxl-tiny"], indirect=True)
def test_astar_on_sdxl(pipeline):
    reference = generate(pipeline, "sdxl-tiny", steps=3, prompt=PROMPT)
    fingerprint = model_fingerprint(pipeline.unet)
    with accel.patched(pipeline, "astar", step_size=0):
        assert (generate(pipeline, "sdxl-tiny", steps=3, prompt=PROMPT) == reference).all()
    with accel.patched(pipeline, "astar", step_size=50):
        guided = generate(pipeline, "sdxl-tiny", steps=3, prompt=PROMPT)
        hook = pipeline.unet._diffusers_hook.get_hook("accel_latent_guidance")
        assert [step for step, _ in hook.state.losses] == [0, 1, 2]
        with pytest.raises(accel.InvalidOptionError, match="leave prompt_2 unset"):
            generate(pipeline, "sdxl-tiny", steps=1, prompt=PROMPT, prompt_2="a green star")
    assert np.abs(guided - reference).max() > 1e-4
    assert model_fingerprint(pipeline.unet) == fingerprint
    assert (generate(pipeline, "sdxl-tiny", steps=3, prompt=PROMPT) == reference).all()


@pytest.mark.parametrize("pipeline", ["sdxl-tiny"], indirect=True)
def test_structured_on_sdxl(pipeline):
    reference = generate(pipeline, "sdxl-tiny", steps=2, prompt=PROMPT)
    with accel.patched(pipeline, "structured", noun_phrases=[PROMPT]):
        assert (generate(pipeline, "sdxl-tiny", steps=2, prompt=PROMPT) == reference).all()
    with accel.patched(pipeline, "structured"):
        structured = generate(pipeline, "sdxl-tiny", steps=2, prompt=PROMPT)
        with pytest.raises(accel.InvalidOptionError, match="leave prompt_2 unset"):
            generate(pipeline, "sdxl-tiny", steps=1, prompt=PROMPT, prompt_2="a green star")
    assert np.abs(structured - reference).max() > 1e-5
    assert (generate(pipeline, "sdxl-tiny", steps=2, prompt=PROMPT) == reference).all()
