"""VMoBA processors for FLUX and HunyuanVideo joint attention: block-sparse visual queries, exact text."""

from __future__ import annotations

from collections.abc import Callable

from diffusers.utils import logging

from accel.kernels.reference import gradients_tracked
from accel.kernels.vmoba import (
    BlockPartition,
    block_attention_reference,
    block_attention_sparse,
    block_partition,
    select_blocks,
)
from accel.processors.dense import AttentionCall, DenseFluxAttnProcessor, DenseHunyuanVideoAttnProcessor
from accel.processors.joint import JointVisualAttend
from accel.processors.state import PatchContext

logger = logging.get_logger(__name__)

# grid -> this layer's block shape (one side per axis, None for the whole axis)
BlockShape = Callable[[tuple[int, ...]], tuple[int | None, ...]]


class _BlockAttend(JointVisualAttend):
    """VMoBA for the visual queries of joint attention (mixed in before the dense processor)."""

    method = "vmoba"

    def __init__(
        self,
        context: PatchContext,
        layer: str,
        block_shape: BlockShape,
        threshold: float,
        dense_steps: int = 0,
        backend: str = "auto",
        cycle: tuple[BlockShape, ...] = (),
    ):
        super().__init__(context=context, layer=layer)
        self.block_shape = block_shape
        # Every patched layer's block shape (layers cycle through them), so a notice can say which layers it meets.
        self.cycle = cycle or (block_shape,)
        self.threshold = threshold
        self.dense_steps = dense_steps
        self.backend = backend

    def _visual_plan(self, call: AttentionCall) -> BlockPartition | None:
        # Every block kept is dense attention: skip the selection and its rounding differences.
        if self.threshold >= 1.0 or self._dense_step():
            return None
        grid = self._visual_grid(call.visual_tokens)
        try:
            partition = block_partition(grid, self.block_shape(grid))
        except ValueError as error:
            raise ValueError(f"vmoba: {self.layer} at token grid {grid}: {error}") from None
        if partition.num_blocks > 1:
            return partition
        notice = ("vmoba", f"one block {grid}")
        if notice not in self.context.warned:
            self.context.warned.add(notice)
            shapes = {_shape_name(shape(grid)): shape(grid) for shape in self.cycle}
            whole = sorted(name for name, shape in shapes.items() if _is_one_block(grid, shape))
            which = "the layers with " + ("that block shape" if len(whole) == 1 else "those block shapes")
            logger.warning(
                "vmoba: the %s token grid is one block of %s, so %s attend densely; give a larger size, or smaller "
                "blocks=[...]",
                "x".join(map(str, grid)),
                " / ".join(whole),
                "all layers" if len(whole) == len(shapes) else which,
            )
        return None

    def _visual_attention(self, query, key, value, text_key, text_value, text_mask, partition):
        selected = select_blocks(query, key, partition, self.threshold)
        backend = self._backend_for(query.device, gradients_tracked(query, key, value, text_key, text_value))
        if backend == "triton":
            from accel.kernels.block_sparse import block_select_attention

            out, _ = block_select_attention(query, key, value, partition, selected, text_key, text_value, text_mask)
            return out
        if backend == "reference":
            self._check_reference_size(query, key, text_key)
        attend = block_attention_reference if backend == "reference" else block_attention_sparse
        return attend(query, key, value, partition, selected, text_key, text_value, text_mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, threshold={self.threshold})"


class VMoBAFluxAttnProcessor(_BlockAttend, DenseFluxAttnProcessor):
    """VMoBA over FLUX's 2-D image-token grid (text tokens first, exact)."""


class VMoBAHunyuanVideoAttnProcessor(_BlockAttend, DenseHunyuanVideoAttnProcessor):
    """VMoBA over HunyuanVideo's 3-D video-token grid (text tokens last, exact, padded keys masked)."""


def _shape_name(shape: tuple[int | None, ...]) -> str:
    return "x".join("all" if side is None else str(side) for side in shape)


def _is_one_block(grid: tuple[int, ...], shape: tuple[int | None, ...]) -> bool:
    try:
        return block_partition(grid, shape).num_blocks == 1
    except ValueError:
        return False
