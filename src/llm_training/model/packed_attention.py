"""Attention inside packed examples: block-diagonal causal masking from per-token segment ids.

A packed window holds several examples one after another (``data/packing.py``); ``segment_ids`` (B, T) number
them, so a query may attend to a key only when both are in the same segment and the key is not later. Two
implementations of the same mask:

- ``"flex"`` (CUDA): FlexAttention with a block mask built from the segment ids, both compiled. Blocks of
  128 x 128 that lie wholly between two examples are skipped, so a window of short examples costs about
  what the examples would cost alone, not the whole window's square.
- ``"sdpa"`` (elsewhere, and the reference): ``scaled_dot_product_attention`` with a boolean (B, 1, T, T)
  mask. Every score is computed and the masked ones dropped: exact, simple, and on a CPU the cost is the
  same order as the rest of the layer at fine-tuning lengths.

Rows never come out empty: every token sees itself (the padding after the last example is a segment too).
Plain batches (no segment ids) never come here: they keep ``is_causal`` and its fast kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flex", "sdpa")
_compiled: dict = {}  # FlexAttention's two functions, compiled once per process on first use


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401  (torch 2.5 and later)
    except ImportError:
        return False
    return True


def _flex():
    """(create_block_mask, flex_attention), compiled: uncompiled FlexAttention materialises every score
    (a slow reference). Inside a compiled model flex_attention is traced into its graph as it is; called
    eagerly, each is compiled once per process. ``dynamic=False``: a run sees few shapes (the micro-batch, a
    shorter last validation batch), and a static kernel per shape is the fast one."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if torch.compiler.is_compiling():
        return create_block_mask, flex_attention
    if not _compiled:
        _compiled["mask"] = torch.compile(create_block_mask, dynamic=False)
        _compiled["attend"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["mask"], _compiled["attend"]


@torch.compiler.disable
def _block_mask(segment_ids: torch.Tensor):
    """FlexAttention's block mask of same-segment causal attention, made outside a compiled model's graph
    (by the separately compiled ``create_block_mask``; one graph break at the start of the forward pass)
    and passed into the attention of every layer, as FlexAttention's documentation uses it."""
    create_block_mask, _ = _flex()
    B, T = segment_ids.shape

    def same_segment_causal(b, h, q, kv):
        return (segment_ids[b, q] == segment_ids[b, kv]) & (q >= kv)

    return create_block_mask(same_segment_causal, B, None, T, T, device=segment_ids.device)


class SegmentMask:
    """The attention of one forward pass over packed windows, built once and shared by every layer.

    ``backend``: ``"auto"`` takes FlexAttention on CUDA (without attention dropout, which it lacks) and
    SDPA's boolean mask otherwise; ``"flex"`` or ``"sdpa"`` force one (the tests compare them)."""

    def __init__(self, segment_ids: torch.Tensor, backend: str = "auto", dropout: float = 0.0) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r}: one of {', '.join(BACKENDS)}")
        if backend == "auto":
            backend = "flex" if segment_ids.is_cuda and dropout == 0.0 and flex_available() else "sdpa"
        if backend == "flex" and dropout:
            raise ValueError("FlexAttention has no attention dropout; use the sdpa backend or dropout 0")
        self.backend, self.dropout = backend, dropout
        B, T = segment_ids.shape
        if backend == "flex":
            self.mask = _block_mask(segment_ids)
        else:
            position = torch.arange(T, device=segment_ids.device)
            causal = position[:, None] >= position[None, :]
            self.mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of q (B, H, T, D) over k, v (B, K, T, D), K dividing H (grouped queries)."""
        if self.backend == "flex":
            _, flex_attention = _flex()
            # views of the fused projection: inductor's CPU kernel read them wrongly inside a compiled model
            # (torch 2.13, every row off); copies cost little next to the attention
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            return flex_attention(q, k, v, block_mask=self.mask, enable_gqa=k.size(1) != q.size(1))
        if k.size(1) != q.size(1):
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=self.dropout)
