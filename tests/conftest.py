import os

# No test may reach a model hub: the machine and CI are offline, and a stray download would hang, not fail.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Without a GPU the Triton kernels run under Triton's interpreter, on CPU tensors (slow: tests keep shapes small).
# It must be set before any kernel is decorated, i.e. before accel.kernels.block_sparse is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(2)

TINY = ("sd15-tiny", "sdxl-tiny", "flux-tiny", "hunyuanvideo-tiny")


@pytest.fixture(scope="session")
def tiny_pipelines():
    """Each tiny pipeline built once per session; tests must leave them unpatched (see `pipeline`)."""
    import accel

    return {name: accel.load_pipeline(name) for name in TINY}


@pytest.fixture
def pipeline(request, tiny_pipelines):
    """The tiny pipeline named by the test's parameter, guaranteed unpatched afterwards."""
    import accel

    pipe = tiny_pipelines[request.param]
    yield pipe
    accel.unpatch(pipe)


@pytest.fixture(scope="session")
def shapes_pipe():
    """The shipped shapes-sd pipeline, loaded once; tests must leave it unpatched."""
    import accel

    pipe = accel.load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe
