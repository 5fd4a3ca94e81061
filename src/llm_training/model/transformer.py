"""The decoder-only transformer: GPT-2 style and Llama style from one ModelConfig.

Shapes: B batch, T time (tokens), C hidden size, H heads, K key/value heads, D head size, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_training.config import MODEL_TYPES, ModelConfig
from llm_training.model.packed_attention import SegmentMask
from llm_training.model.rope import apply_rope, rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg: ModelConfig, dim: int, style: str) -> nn.Module:
    if style == "llama":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, style: str) -> None:
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.n_kv = cfg.num_kv_heads or cfg.num_attention_heads
        self.head_dim = head_size(cfg)
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        self.qkv = nn.Linear(cfg.hidden_size, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.bias)
        self.proj.residual_scale = True  # type: ignore[attr-defined]
        self.q_norm = make_norm(cfg, self.head_dim, style) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, self.head_dim, style) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerCache | None = None,
        segments: SegmentMask | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv, self.head_dim).transpose(1, 2)
        qk, v = qkv.split([self.n_head + self.n_kv, self.n_kv], 1)  # (B, H + K, T, D), (B, K, T, D)
        if self.q_norm is not None:
            q, k = qk.split([self.n_head, self.n_kv], 1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], 1)
        if rope is not None:  # queries and keys rotated together: half the kernels (decoding is launch-bound)
            qk = apply_rope(qk, *rope)
        q, k = qk.split([self.n_head, self.n_kv], 1)  # (B, H, T, D), (B, K, T, D)
        if segments is not None:  # packed examples: attention stays inside each one
            return self.proj(segments.attend(q, k, v).transpose(1, 2).reshape(B, T, -1))
        mask, causal = None, True
        if cache is not None:  # generation: attend to every earlier token kept in the cache
            k, v = cache.append(k, v)
            mask, causal = cache.mask, False
        if self.n_kv != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


def head_size(cfg: ModelConfig) -> int:
    """One attention head's width: as set (Qwen3's may differ from hidden_size / heads), else the split."""
    return cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads


def mlp_width(cfg: ModelConfig, style: str) -> int:
    """The MLP's inner width: as set, else about 8/3 x for the gated (llama) MLP, rounded up to a multiple
    of 64, which keeps parameters near the 4x of the GELU (gpt2) MLP."""
    if cfg.intermediate_size:
        return cfg.intermediate_size
    return 64 * math.ceil(8 * cfg.hidden_size / 3 / 64) if style == "llama" else 4 * cfg.hidden_size


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, style: str) -> None:
        super().__init__()
        self.gated = style == "llama"
        width = mlp_width(cfg, style)
        self.up = nn.Linear(cfg.hidden_size, width * (2 if self.gated else 1), bias=cfg.bias)
        self.down = nn.Linear(width, cfg.hidden_size, bias=cfg.bias)
        self.down.residual_scale = True  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, style: str) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.hidden_size, style)
        self.attn = Attention(cfg, style)
        self.norm2 = make_norm(cfg, cfg.hidden_size, style)
        self.mlp = MLP(cfg, style)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope, cache: LayerCache | None = None, segments=None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, segments))
        return x + self.drop(self.mlp(self.norm2(x)))


class _FusedHeadLoss(torch.autograd.Function):
    """Output head + mean cross-entropy, ``chunk`` tokens at a time, with the gradients computed in the
    forward pass (as Liger-Kernel's fused linear cross-entropy does): memory holds one chunk's logits
    (chunk x vocabulary) instead of the whole batch's, and the logits are never recomputed."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk: int):
        valid = labels != -100
        count = valid.sum().clamp(min=1)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.size(0), chunk):
            hc, yc, vc = h[start : start + chunk], labels[start : start + chunk], valid[start : start + chunk]
            logits = (hc @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            target = yc.clamp(min=0)
            total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * vc).sum()
            d_logits = torch.exp(logits - lse[:, None])  # softmax
            d_logits[torch.arange(yc.numel(), device=yc.device), target] -= 1.0
            d_logits *= vc[:, None]
            d_logits = d_logits.to(hc.dtype) if hc.dtype != torch.float32 else d_logits
            grad_h[start : start + chunk] = (d_logits @ weight.to(d_logits.dtype)).to(h.dtype)
            grad_w += (d_logits.t() @ hc.to(d_logits.dtype)).float()
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_output / count
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None


def chunked_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of the output head over ``chunk`` tokens at a time (see ``_FusedHeadLoss``)."""
    return _FusedHeadLoss.apply(h.reshape(-1, h.size(-1)), weight, labels.reshape(-1), chunk)


class Transformer(nn.Module):
    """``model(input_ids)`` returns logits (B, T, V); ``model(input_ids, labels)`` returns the mean loss."""

    attention_backend = "auto"  # of packed batches (packed_attention.SegmentMask): auto, flex or sdpa
    loss_in_fp32 = True  # upcast logits before the loss (the softmax of a large vocabulary needs fp32 sums)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError(
                "ModelConfig.vocab_size must be set (the tokenizer's size) before building the model"
            )
        device = torch.get_default_device()
        if (
            device.type != "meta"
        ):  # built for real: refuse what cannot fit where it is built, before allocating
            from llm_training.model.footprint import check_fits

            check_fits(cfg, device)
        self.cfg = cfg
        self.style = MODEL_TYPES[cfg.model_type.lower()]
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.max_seq_length, cfg.hidden_size) if self.style == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, self.style) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size, self.style)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if self.style == "llama":
            self._rope_buffers()
        self.apply(self._init)

    def _rope_buffers(self, device=None) -> None:
        cos, sin = rope_tables(self.cfg, head_size(self.cfg), device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
        """A model whose weights are ``state``'s tensors themselves: built on the meta device and assigned, so
        nothing is initialised at random or held twice (an import needs memory for one model, not two).
        A tensor of another shape, or one missing, raises RuntimeError."""
        with torch.device("meta"):
            model = cls(cfg)
        embed, head = state.get("embed.weight"), state.get("lm_head.weight")
        if cfg.tie_embeddings and embed is not None:
            state = {**state, "lm_head.weight": embed}
        elif embed is not None and head is not None and head.data_ptr() == embed.data_ptr():
            state = {**state, "lm_head.weight": head.clone()}  # untied from a tied model: a head of its own
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_embeddings:  # assigning gave the head a Parameter of its own: one again
            model.lm_head.weight = model.embed.weight
        if model.style == "llama":
            model._rope_buffers(model.embed.weight.device)
        return model

    def _init(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            scale = (
                1 / math.sqrt(2 * self.cfg.num_layers) if getattr(module, "residual_scale", False) else 1.0
            )
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        prefix: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss (with ``labels``) or logits. With a ``cache`` (generation), ``input_ids`` continue the cached
        tokens: their keys and values are added to it and they attend to everything before them. ``prefix``
        (B, P, hidden): embeddings placed before the tokens (an image's), attended to but not predicted.
        Packed examples (training): ``position_ids`` (B, T) each token's position in its own example and
        ``segment_ids`` (B, T) which example it is in; attention never crosses from one to another."""
        if input_ids.dim() == 1:  # one sequence (a user scoring a single sample): logits (T, V)
            out = self.forward(input_ids[None], None if labels is None else labels[None], cache)
            return out if labels is not None else out[0]
        x = self.embed(input_ids)
        P = 0
        if prefix is not None:
            P = prefix.size(1)
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        B, T = x.shape[:2]
        if cache is None and self.cfg.max_seq_length < T:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.cfg.max_seq_length})")
        rope, segments = None, None
        if segment_ids is not None:
            if cache is not None or P:
                raise ValueError("segment_ids are for training on packed text: no cache, no prefix")
            dropout = self.cfg.dropout if self.training else 0.0
            segments = SegmentMask(segment_ids, self.attention_backend, dropout)
        if cache is not None or position_ids is not None:  # each row's own positions
            positions = cache.positions if cache is not None else position_ids
            if self.pos_embed is not None:
                x = x + self.pos_embed(positions)
            else:
                rope = (self.rope_cos[positions], self.rope_sin[positions])
        elif self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=input_ids.device))
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, rope, cache.layers[i])
            elif self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, None, segments, use_reentrant=False)
            else:
                x = block(x, rope, None, segments)
        h = self.norm(x)
        if P:
            h = h[:, P:]
        if labels is not None and self.cfg.loss_chunk_tokens:
            return chunked_loss(h, self.lm_head.weight, labels, self.cfg.loss_chunk_tokens)
        logits = self.lm_head(h)
        if labels is None:
            return logits
        if self.loss_in_fp32:
            logits = logits.float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)

    def num_parameters(self, non_embedding: bool = False) -> int:
        total = sum(_values(p) for p in self.parameters())
        if non_embedding:
            total -= self.embed.weight.numel()
            if self.pos_embed is not None:
                total -= self.pos_embed.weight.numel()
        return total

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 x non-embedding parameters + the lm head + attention scores (PaLM appendix B)."""
        c = self.cfg
        head = c.vocab_size * c.hidden_size if c.tie_embeddings else 0  # a tied head is not counted above
        return (
            6 * (self.num_parameters(non_embedding=True) + head)
            + 12 * c.num_layers * c.hidden_size * c.max_seq_length
        )


def _values(p: torch.Tensor) -> int:
    """Weights a parameter stands for: a 4-bit one (QLoRA, bitsandbytes) packs two a byte, its shape is in
    its quantization state."""
    state = getattr(p, "quant_state", None)
    return p.numel() if state is None else state.shape.numel()


def device_of(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its parameters' device; CPU for a runtime without torch parameters
    (an ONNX or TorchScript wrapper)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


class LayerCache:
    """One layer's keys and values, (B, kv heads, max_len, head dim), filled left to right."""

    def __init__(self, owner: KVCache) -> None:
        self.owner = owner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.owner.mask

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:  # allocated on first use, in the dtype the layer computes in (bf16 under autocast)
            shape = (k.size(0), k.size(1), self.owner.max_len, k.size(3))
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)  # zeros: masked slots must not be NaN
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        # written at slots given by a device tensor, not a Python int: a decoding step is then the same
        # kernels on the same buffers every time, which a CUDA graph can replay
        self.k.index_copy_(2, self.owner.slots, k.to(self.k.dtype))
        self.v.index_copy_(2, self.owner.slots, v.to(self.v.dtype))
        # the whole buffer, unfilled slots masked: one shape for every step, so attention kernels that plan
        # per shape (cuDNN) plan once, not at every token
        return self.k, self.v


def cache_mask(valid: torch.Tensor, slots: torch.Tensor, total: int) -> torch.Tensor:
    """(B, 1, T, total) attention mask of T new tokens at cache ``slots`` over ``total`` cache places: causal,
    padding (``valid`` False) hidden, and each token seeing itself so that no softmax row is empty."""
    queries = slots[:, None]
    keys = torch.arange(total, device=valid.device)[None, :]
    allowed = (keys <= queries)[None] & valid[:, None, :]
    return (allowed | (keys == queries)[None])[:, None]


class KVCache:
    """Keys and values of every layer for a batch of sequences being generated.

    Prompts of different lengths are left-padded: ``step(valid)`` takes which new tokens are real, gives each
    real token the next position of its own row (so padding does not shift RoPE or learned positions), and
    builds the attention mask: causal, padding hidden, and each padding position seeing itself so that no
    row of the softmax is empty.
    """

    def __init__(self, model: Transformer, batch: int, max_len: int, device: torch.device) -> None:
        if max_len > model.cfg.max_seq_length:
            raise ValueError(f"{max_len} tokens do not fit the context ({model.cfg.max_seq_length})")
        self.max_len, self.length = max_len, 0  # ``length`` mirrors ``cursor`` on the host, for checks
        self.layers = [LayerCache(self) for _ in range(model.cfg.num_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.cursor = torch.zeros((), dtype=torch.long, device=device)  # the first free slot
        self.slots: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def step(self, valid: torch.Tensor) -> None:
        """Prepare the forward pass of the next ``valid.shape[1]`` tokens (``valid``: (B, T) bool). Only
        device tensors are read, so a recorded step replays correctly."""
        self.check_room(valid.size(1))
        self.prepare(valid)

    @property
    def full(self) -> bool:
        return self.length >= self.max_len

    def check_room(self, T: int) -> None:
        if self.length + T > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens; {self.length + T} asked for")

    def prepare(self, valid: torch.Tensor) -> None:
        """``step`` without its host-side check: device work only, which a compiled or recorded step can
        hold (the caller checks that the tokens fit)."""
        T = valid.size(1)
        self.slots = self.cursor + torch.arange(T, device=valid.device)
        self.valid.index_copy_(1, self.slots, valid)
        counts = torch.cumsum(valid.long(), dim=1)
        self.positions = (self.next_position[:, None] + counts - 1).clamp(min=0)
        self.next_position += counts[:, -1]
        self.mask = cache_mask(self.valid, self.slots, self.max_len)

    def advance(self) -> None:
        T = self.positions.size(1)
        self.length += T
        self.cursor += T
