"""HiDiffusion's MSW-MSA as an attention processor: large shifted windows in a UNet's top self-attention layers."""

from __future__ import annotations

import hashlib

import torch
from diffusers.utils import logging

from accel.kernels.reference import gradients_tracked
from accel.kernels.windows import SHIFT_QUARTERS, quarter_shifted_window_attention, windows_divide
from accel.processors.dense import AttentionCall, DenseAttnProcessor, resolve_kernel_backend
from accel.processors.state import PatchContext

logger = logging.get_logger(__name__)

SHIFT_MODES = ("random", "none")


class MSWMSAAttnProcessor(DenseAttnProcessor):
    """Self-attention within ``windows`` windows of the level's token grid, cyclically shifted at every step.

    The shift of each call is one of ``{0, 1/4, 1/2, 3/4}`` of the window per axis, as in HiDiffusion, but drawn from
    a hash of ``(shift_seed, step index, layer index)`` instead of the global RNG: the same seed and prompt give the
    same image, repeated generations agree, and the rest of the program's random stream is untouched.

    ``backend``: ``"torch"`` (batched SDPA over the windows), ``"triton"`` (the block-sparse kernel, where the
    windows divide the grid; other grids take the SDPA path, with a warning) or ``"auto"`` (Triton on CUDA).
    """

    def __init__(
        self,
        context: PatchContext,
        layer: str,
        layer_index: int,
        windows: tuple[int, int],
        window_size: tuple[int, int] | None = None,
        shift: str = "random",
        shift_seed: int = 0,
        backend: str = "auto",
    ):
        super().__init__(context=context, layer=layer)
        self.layer_index = layer_index
        self.windows = windows
        self.window_size = window_size
        self.shift = shift
        self.shift_seed = shift_seed
        self.backend = backend
        self._warned_grids: set[tuple[int, int]] = set()
        self._warned_padded: set[tuple[int, int]] = set()
        self._quarter_tensors_by_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def attend(self, query, key, value, attention_mask, call: AttentionCall):
        if call.kind != "self" or attention_mask is not None:
            return super().attend(query, key, value, attention_mask, call)
        grid = self.context.layout.level_grid(call.visual_tokens)
        windows = self._fitting_windows(grid)
        if windows == (1, 1):
            return super().attend(query, key, value, attention_mask, call)
        tracked = gradients_tracked(query, key, value)
        backend = resolve_kernel_backend("hidiffusion", self.backend, query.device, tracked, self.context)
        if backend == "triton" and not windows_divide(grid, windows):
            if grid not in self._warned_padded:
                self._warned_padded.add(grid)
                # Asked for by name, the kernel's absence is news; under "auto" it is the documented choice.
                log = logger.warning if self.backend == "triton" else logger.info
                log(
                    f"{self.layer}: {windows[0]}x{windows[1]} windows do not divide the {grid[0]}x{grid[1]} token "
                    "grid, so its padded windows run on SDPA instead of the Triton kernel"
                )
            backend = "torch"
        return quarter_shifted_window_attention(query, key, value, grid, windows, self._quarter(), backend)

    def _fitting_windows(self, grid: tuple[int, int]) -> tuple[int, int]:
        if self.window_size is not None:
            if any(size > side for size, side in zip(self.window_size, grid, strict=True)):
                raise ValueError(
                    f"hidiffusion: window_size={self.window_size} is larger than the {grid[0]}x{grid[1]} token grid "
                    f"of {self.layer}; use a window_size of at most {grid}, or windows=2 to adapt to any size"
                )
            return tuple(-(-side // size) for side, size in zip(grid, self.window_size, strict=True))
        fitted = tuple(min(count, side) for count, side in zip(self.windows, grid, strict=True))
        if fitted != self.windows and grid not in self._warned_grids:
            self._warned_grids.add(grid)
            logger.warning(
                f"{self.layer}: a {grid[0]}x{grid[1]} token grid cannot hold {self.windows[0]}x{self.windows[1]} "
                f"windows; using {fitted[0]}x{fitted[1]} ({'dense attention' if fitted == (1, 1) else 'fewer'})"
            )
        return fitted

    def prepare_step(self, device: torch.device, inputs: dict) -> None:
        """Draw this step's shift before the denoiser runs (called by the step hook, outside any compiled graph)."""
        if self.shift == "none":
            return
        quarter = self._draw_quarter()
        self.context.scratch[self._scratch_key] = (quarter, self._quarter_tensors(device)[quarter])

    def _quarter_tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        # Made once per device, not per step (each a host-to-device copy on a GPU), and per layer: layers holding the
        # same tensor would make Dynamo guard on which ones alias, and recompile as the shifts change.
        tensors = self._quarter_tensors_by_device.get(device)
        if tensors is None:
            tensors = tuple(torch.tensor([quarter], device=device) for quarter in range(SHIFT_QUARTERS))
            self._quarter_tensors_by_device[device] = tensors
        return tensors

    @property
    def _scratch_key(self) -> tuple[str, int]:
        return ("mswmsa shift", self.layer_index)

    def _quarter(self) -> int | torch.Tensor:
        """This step's shift in quarters of a window: a tensor under torch.compile, so one graph serves every step."""
        if self.shift == "none":
            return 0
        drawn = self.context.scratch.get(self._scratch_key)
        if drawn is None:  # called outside the step hook (a processor driven by hand)
            return self._draw_quarter()
        return drawn[1] if torch.compiler.is_compiling() else drawn[0]

    def _draw_quarter(self) -> int:
        step = self.context.step
        if step is None:
            position = -1
        elif step.step_index is not None:
            position = step.step_index
        else:
            position = round(step.timestep)
        # A mixing hash: CRC32 is linear, so changing the seed XORs every draw with one constant and can leave all
        # the quarters unchanged.
        digest = hashlib.blake2b(f"{self.shift_seed}/{position}/{self.layer_index}".encode(), digest_size=8).digest()
        return digest[0] % SHIFT_QUARTERS
