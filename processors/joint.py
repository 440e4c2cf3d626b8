"""The split every sparse method makes of FLUX / HunyuanVideo joint attention: visual queries one way, text exactly.

The joint sequence holds text and visual tokens (text first in FLUX, last in HunyuanVideo). A method decides per
call whether it applies (``_visual_plan``) and computes the visual queries' attention (``_visual_attention``) from the
visual keys plus the text keys (HunyuanVideo's padded text keys stay masked); text queries attend the whole
sequence, exactly as dense.
"""

from __future__ import annotations

import itertools
import math
import weakref

import torch
from diffusers.utils import logging

from accel.errors import UnsupportedModelError
from accel.processors.dense import AttentionCall, resolve_kernel_backend
from accel.processors.parallel import ulysses_attend, ulysses_group

logger = logging.get_logger(__name__)

# The largest explicit score matrix backend="reference" may build (see `_check_reference_size`).
REFERENCE_BYTES_LIMIT = 4 * 2**30

# Processors whose attention a compiled graph calls through `joint_attention_op`, by a key of their own (an id could
# be reused by a later object).
_OPAQUE_ATTENTION: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_OPAQUE_KEYS = itertools.count()


class JointVisualAttend:
    """Mixed in before a dense FLUX / HunyuanVideo processor; subclasses define the two hooks below."""

    method = ""  # the method's registry name, for messages
    dense_steps = 0  # the first denoising steps run dense
    backend = "auto"  # "auto", "torch", "triton" or "reference" (what each method offers)
    _warned_no_schedule = False
    # Whether `_visual_attention` reads its plan from data in Python (then compiled graphs call it opaquely, see
    # `attend`).
    plans_from_data = True

    # Key of the per-call text padding mask in the patch context's scratch space (shared by a call's layers).
    _TEXT_MASK_KEY = "joint_text_mask"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._opaque_key = next(_OPAQUE_KEYS)
        _OPAQUE_ATTENTION[self._opaque_key] = self

    def _visual_plan(self, call: AttentionCall):
        """What `_visual_attention` needs for this call, or ``None`` to run it dense."""
        raise NotImplementedError

    def _visual_attention(self, query, key, value, text_key, text_value, text_mask, plan):
        """Visual queries' attention on ``[B, S, H, D]`` visual tensors plus the text keys (``None`` without text)."""
        raise NotImplementedError

    def attend(self, query, key, value, attention_mask, call: AttentionCall):
        if self.plans_from_data and torch.compiler.is_compiling():
            # Its plans (tiles, selected blocks, the text mask's "all kept" test) are read from data into Python and
            # its Triton launches are not traceable: to the graph the attention is one opaque operator, which runs
            # this processor eagerly, so the denoiser stays one graph.
            return torch.ops.accel.joint_attention(
                query,
                key,
                value,
                attention_mask,
                self._opaque_key,
                call.kind,
                call.visual_tokens,
                call.text_tokens,
                call.text_first,
            )
        return self._joint_attend(query, key, value, attention_mask, call)

    def _joint_attend(self, query, key, value, attention_mask, call: AttentionCall):
        if call.kind == "joint" and self._parallel_config is not None:
            ulysses = ulysses_group(self._parallel_config, self.method)
            if ulysses is not None:
                group, degree, _ = ulysses
                # Back here with the whole sequence for this rank's heads, and no parallel config.
                return ulysses_attend(self, query, key, value, attention_mask, call, group, degree)
        plan = self._visual_plan(call) if call.kind == "joint" else None
        if plan is None:
            return super().attend(query, key, value, attention_mask, call)
        text = call.text_tokens
        visual = slice(text, None) if call.text_first else slice(0, call.visual_tokens)
        text_part = slice(0, text) if call.text_first else slice(call.visual_tokens, None)
        text_mask = None if attention_mask is None else self._text_mask(attention_mask, query.shape[0], text_part)
        visual_out = self._visual_attention(
            query[:, visual],
            key[:, visual],
            value[:, visual],
            key[:, text_part] if text else None,
            value[:, text_part] if text else None,
            text_mask,
            plan,
        )
        if not text:
            return visual_out
        text_out = super().attend(query[:, text_part], key, value, attention_mask, call)
        parts = [text_out, visual_out] if call.text_first else [visual_out, text_out]
        return torch.cat([part.to(query.dtype) for part in parts], dim=1)

    def _backend_for(self, device: torch.device, tracked: bool = False) -> str:
        return resolve_kernel_backend(self.method, self.backend, device, tracked, self.context)

    def _check_reference_size(self, query, key, text_key) -> None:
        """``backend="reference"`` writes out the fp32 scores and mask of every query-key pair (it is the oracle the
        other paths are tested against): refused where they would not fit, rather than left to exhaust memory."""
        batch, queries, heads, _ = query.shape
        keys = key.shape[1] + (text_key.shape[1] if text_key is not None else 0)
        needed = batch * heads * queries * keys * 5  # fp32 scores and a bool mask
        if needed > REFERENCE_BYTES_LIMIT:
            raise ValueError(
                f"{self.method}: backend='reference' would write out {needed / 2**30:.1f} GiB of scores for "
                f"{queries} queries x {keys} keys x {heads} heads (it is the explicit-mask oracle, for small sizes); "
                "use backend='torch' (the same result, tiled) or 'auto'"
            )

    def _dense_step(self) -> bool:
        """Whether this call falls in the first ``dense_steps`` steps (known only when a pipeline was patched)."""
        if not self.dense_steps:
            return False
        step = self.context.step if self.context is not None else None
        if step is None or step.step_index is None:
            if not self._warned_no_schedule:
                logger.warning(
                    "%s: dense_steps=%d is ignored for %s: the model was patched without its pipeline, so the "
                    "step index is unknown; patch the pipeline instead",
                    self.method,
                    self.dense_steps,
                    self.layer,
                )
                self._warned_no_schedule = True
            return False
        return step.step_index < self.dense_steps

    def _visual_grid(self, visual_tokens: int) -> tuple[int, ...]:
        layout = self.context.layout if self.context is not None else None
        grid = None if layout is None else layout.grid
        if grid is None or math.prod(grid) != visual_tokens:
            raise UnsupportedModelError(
                f"{self.method}: {self.layer} received {visual_tokens} visual tokens but the recorded token grid is "
                f"{grid}; {self.method} needs the image tokens to be the latent's own grid (FLUX img_ids / "
                "HunyuanVideo latent shape). Pipelines that append tokens of their own (a reference image, as FLUX "
                "Kontext does) are not supported; with context parallelism, call enable_parallelism before "
                "accel.patch, so that accel's hook sees the inputs before they are split"
            )
        return grid

    def _text_mask(self, attention_mask: torch.Tensor, batch: int, text_part: slice) -> torch.Tensor | None:
        """The text keys' padding mask, or ``None`` when nothing is padded.

        Every layer of a denoiser call receives the same mask tensor, and ``.all()`` is a host sync on GPUs, so it is
        derived once per call and shared through the patch context (holding the tensor keeps the identity check
        sound).
        """
        cached = self.context.scratch.get(self._TEXT_MASK_KEY) if self.context is not None else None
        if cached is not None and cached[0] is attention_mask:
            return cached[1]
        text_mask = key_padding_mask(attention_mask, batch, attention_mask.shape[-1])[:, text_part]
        if bool(text_mask.all()):
            text_mask = None
        if self.context is not None:
            self.context.scratch[self._TEXT_MASK_KEY] = (attention_mask, text_mask)
        return text_mask


@torch.library.custom_op("accel::joint_attention", mutates_args=())
def joint_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    processor: int,
    kind: str,
    visual_tokens: int,
    text_tokens: int,
    text_first: bool,
) -> torch.Tensor:
    """A `JointVisualAttend` processor's attention (``processor``: its key), run eagerly inside a compiled graph."""
    owner = _OPAQUE_ATTENTION.get(processor)
    if owner is None:
        raise RuntimeError(
            "accel: a compiled graph called the attention of a processor that no longer exists (its patch was undone "
            "and the processor freed); compile the denoiser again"
        )
    call = AttentionCall(kind=kind, visual_tokens=visual_tokens, text_tokens=text_tokens, text_first=text_first)
    out = owner._joint_attend(query, key, value, attention_mask, call)
    # The compiled graph was planned with the fake's layout and dtype.
    return out.to(query.dtype).contiguous()


@joint_attention_op.register_fake
def _(query, key, value, attention_mask, processor, kind, visual_tokens, text_tokens, text_first):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _refuse_backward(ctx, grad):
    raise RuntimeError(
        "accel: GNA / VMoBA under torch.compile are for inference; differentiate through them uncompiled (A-STAR's "
        "guided passes already run uncompiled)"
    )


joint_attention_op.register_autograd(_refuse_backward)


def key_padding_mask(attention_mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor:
    """``[B, S_k]`` booleans from a key-padding mask broadcastable to ``[B, 1, 1, S_k]`` (HunyuanVideo's form)."""
    if attention_mask.dtype != torch.bool:
        raise ValueError("only boolean key-padding masks are supported (HunyuanVideo's form)")
    if attention_mask.ndim == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1:
        return attention_mask[:, 0, 0].expand(batch, keys)
    if attention_mask.ndim == 2:
        return attention_mask.expand(batch, keys)
    raise ValueError(f"attention masks of shape {tuple(attention_mask.shape)} are not key-padding masks")
