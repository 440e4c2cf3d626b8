"""Reference ("dense") attention processors for the UNet, FLUX and HunyuanVideo.

They reproduce diffusers' own processors (``AttnProcessor2_0``, ``FluxAttnProcessor``,
``HunyuanVideoAttnProcessor2_0``) and route the attention product through one method, ``attend``, which receives
``query``, ``key`` and ``value`` as ``[B, S, H, D]`` together with an ``AttentionCall`` describing the token layout.
Every accel method subclasses one of these classes and overrides ``attend``; the projections, norms, RoPE and output
projections stay here, written once.

Conventions kept from diffusers:
- every ``__call__`` argument is named (``Attention.forward`` drops kwargs that the signature does not name, which
  would silently lose ``image_rotary_emb``), and FLUX's positional order is kept;
- ``_attention_backend`` / ``_parallel_config`` are honoured, so ``model.set_attention_backend(...)`` and context
  parallelism keep working on patched models;
- processors are plain objects, not ``nn.Module``s, so they never enter ``state_dict``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.utils import logging

from accel.processors.parallel import sequence_shards
from accel.processors.state import PatchContext

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class AttentionCall:
    """How the tokens of one attention product are arranged.

    Attributes:
        kind (`str`): ``"self"`` (visual tokens attend to themselves), ``"cross"`` (visual queries, text keys) or
            ``"joint"`` (one sequence holding text and visual tokens, FLUX / HunyuanVideo).
        visual_tokens (`int`): Number of visual tokens in the query sequence.
        text_tokens (`int`): Number of text tokens in the joint sequence (``"joint"``) or in the keys (``"cross"``).
        text_first (`bool`): For ``"joint"``: whether text tokens come before the visual ones.
    """

    kind: str
    visual_tokens: int
    text_tokens: int = 0
    text_first: bool = False


def resolve_kernel_backend(
    method: str, backend: str, device: torch.device, tracked: bool = False, context: PatchContext | None = None
) -> str:
    """The kernel a method runs on ``device``: ``backend`` checked, or ``"auto"`` resolved (Triton on CUDA).

    The Triton kernels have no backward pass, so where autograd records the call (``tracked``: latent guidance
    composed with this method) the torch path runs, whose gradients are tested against the reference; a Triton
    backend asked for by name says so once per patch (``context``).
    """
    from accel.kernels.block_sparse import triton_usable

    if backend == "triton" and not triton_usable(device):
        raise RuntimeError(
            f"{method}: backend='triton' needs a CUDA device and triton (tensors are on {device}); "
            "use backend='torch' or 'auto'"
        )
    resolved = backend
    if backend == "auto":
        resolved = "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if resolved != "triton" or not tracked:
        return resolved
    if backend == "triton" and context is not None and (method, "triton-backward") not in context.warned:
        context.warned.add((method, "triton-backward"))
        logger.warning(
            "%s: the Triton kernel has no backward pass, so calls that record gradients (latent guidance such as "
            "A-STAR) run the torch path",
            method,
        )
    return "torch"


class _ProcessorType(type):
    """Refuses ``Processor()`` where the class needs arguments, with what to do instead: diffusers rebuilds every
    processor as ``type(processor)()`` when it loads or unloads an IP-Adapter. (A metaclass, so copies and pickles,
    which make instances without calling the class, are unaffected.)"""

    def __call__(cls, *args, **kwargs):
        if not args and not kwargs and _has_required_arguments(cls):
            raise TypeError(
                f"{cls.__name__}() needs what accel.patch gives it; diffusers rebuilds every attention processor "
                "when it loads or unloads an IP-Adapter, which cannot be done while patched: call "
                "accel.unpatch(pipe), load or unload the adapter, then patch again"
            )
        return super().__call__(*args, **kwargs)


class DenseAttentionProcessorBase(metaclass=_ProcessorType):
    """Shared seam: subclasses override ``attend``; the default computes exact attention through diffusers."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, context: PatchContext | None = None, layer: str = ""):
        self.context = context
        self.layer = layer

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        call: AttentionCall,
    ) -> torch.Tensor:
        """Attention product on ``[B, S, H, D]`` tensors; returns ``[B, S_q, H, D]``."""
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )

    def _attend_joint(self, query, key, value, attention_mask, text_tokens: int, text_first: bool) -> torch.Tensor:
        """``attend`` on a sequence holding text and visual tokens; returns ``[B, S, H * D]``."""
        call = AttentionCall(
            kind="joint",
            visual_tokens=query.shape[1] - text_tokens,
            text_tokens=text_tokens,
            text_first=text_first,
        )
        return self.attend(query, key, value, attention_mask, call).flatten(2, 3).to(query.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r})"


class DenseAttnProcessor(DenseAttentionProcessorBase):
    """Reference processor for diffusers' legacy ``Attention`` in UNets (SD 1.x / 2.x, SDXL): self and cross attention."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        spatial_shape = None
        if hidden_states.ndim == 4:
            spatial_shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        batch_size = hidden_states.shape[0]
        key_length = (encoder_hidden_states if is_cross else hidden_states).shape[1]

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if is_cross and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        context = encoder_hidden_states if is_cross else hidden_states
        query, key, value = _legacy_qkv(attn, hidden_states, context, self._value_context(context, is_cross))

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim)
        value = value.view(batch_size, -1, attn.heads, head_dim)
        # diffusers normalises q/k in [B, H, S, D]; the norms act on the last dim, so the layout does not matter.
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        call = AttentionCall(
            kind="cross" if is_cross else "self",
            visual_tokens=query.shape[1],
            text_tokens=key_length if is_cross else 0,
        )
        hidden_states = self.attend(query, key, value, attention_mask, call)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if spatial_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(spatial_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _value_context(self, context: torch.Tensor, is_cross: bool) -> torch.Tensor:
        """What ``to_v`` projects (the keys' context here; structured guidance gives the values their own)."""
        return context

    def attend(self, query, key, value, attention_mask, call):
        if self._attention_backend is None and self._parallel_config is None:
            # diffusers' UNet processor calls SDPA directly (never the dispatcher), so the UNet keeps following
            # that path unless a backend was set on the model explicitly; this keeps "dense" bit-exact.
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2),
                key.transpose(1, 2),
                value.transpose(1, 2),
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
            )
            return out.transpose(1, 2)
        return super().attend(query, key, value, attention_mask, call)


def _legacy_qkv(attn, hidden_states: torch.Tensor, context_states: torch.Tensor, value_states: torch.Tensor):
    """q, k, v projections of a legacy ``Attention``, using fused weights when ``fuse_projections`` made them;
    ``value_states`` feeds ``to_v`` (it is ``context_states`` except under structured guidance)."""
    separate_values = value_states is not context_states
    if getattr(attn, "fused_projections", False):
        if attn.is_cross_attention:
            key, value = attn.to_kv(context_states).chunk(2, dim=-1)
            if separate_values:
                value = attn.to_kv(value_states).chunk(2, dim=-1)[1]
            return attn.to_q(hidden_states), key, value
        if not separate_values:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(context_states), attn.to_v(value_states)


class DenseFluxAttnProcessor(DenseAttentionProcessorBase):
    """Reference processor for ``FluxAttention``: double blocks (text stream + image stream) and single blocks."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        # diffusers' own helper, so fused (``to_qkv`` / ``to_added_qkv``) and plain projections both work.
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, text_query, text_key, text_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        # A fixed head_dim with -1 heads keeps the processor agnostic to tensor-parallel head sharding.
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        double_block = attn.added_kv_proj_dim is not None and encoder_hidden_states is not None
        if double_block:
            text_tokens = encoder_hidden_states.shape[1]
            text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))
            text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
            text_value = text_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        else:
            # Single blocks receive text and image already joined (text first); the hook recorded the text length.
            layout = self.context.layout if self.context is not None else None
            text_tokens = layout.text_tokens if layout is not None else 0
            # Under context parallelism this rank holds an equal share of the text (the split is contiguous).
            text_tokens //= sequence_shards(self._parallel_config)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend_joint(query, key, value, attention_mask, text_tokens, text_first=True)

        if not double_block:
            return hidden_states
        text_out, image_out = hidden_states.split_with_sizes(
            [text_tokens, hidden_states.shape[1] - text_tokens], dim=1
        )
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out


class DenseHunyuanVideoAttnProcessor(DenseAttentionProcessorBase):
    """Reference processor for HunyuanVideo's dual- and single-stream blocks (text tokens appended after video)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        text_tokens = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        separate_text_stream = attn.add_q_proj is not None
        if not separate_text_stream and text_tokens:
            # Single-stream blocks project text and video with the same weights.
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            # RoPE covers the video tokens only; text tokens (at the end) are not rotated.
            video_tokens = query.shape[1] - (0 if separate_text_stream else text_tokens)
            query = _rotate_prefix(query, image_rotary_emb, video_tokens)
            key = _rotate_prefix(key, image_rotary_emb, video_tokens)

        if separate_text_stream and text_tokens:
            if getattr(attn, "fused_projections", False):
                text_query, text_key, text_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text_query = attn.add_q_proj(encoder_hidden_states)
                text_key = attn.add_k_proj(encoder_hidden_states)
                text_value = attn.add_v_proj(encoder_hidden_states)
            text_query = text_query.unflatten(2, (attn.heads, -1))
            text_key = text_key.unflatten(2, (attn.heads, -1))
            text_value = text_value.unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=1)
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, text_value], dim=1)

        hidden_states = self._attend_joint(query, key, value, attention_mask, text_tokens, text_first=False)

        if not text_tokens:
            return hidden_states, encoder_hidden_states
        video_out, text_out = hidden_states[:, :-text_tokens], hidden_states[:, -text_tokens:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def _rotate_prefix(tokens: torch.Tensor, rotary_emb, prefix: int) -> torch.Tensor:
    if prefix == tokens.shape[1]:
        return apply_rotary_emb(tokens, rotary_emb, sequence_dim=1)
    rotated = apply_rotary_emb(tokens[:, :prefix], rotary_emb, sequence_dim=1)
    return torch.cat([rotated, tokens[:, prefix:]], dim=1)


@functools.cache
def _has_required_arguments(cls) -> bool:
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return any(
        p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters
    )
