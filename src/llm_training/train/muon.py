"""Muon: ``CPUMuon`` for CPUs (the update of ``torch.optim.Muon`` with the Newton-Schulz iteration in float32)
and ``BatchedMuon`` for GPUs (``torch.optim.Muon``'s bfloat16 update, the matrices of one shape together).

``torch.optim.Muon`` orthogonalises in bfloat16, which is fast on GPUs and slow on most CPUs (about 15x
slower per step in our 2-core measurements), so CPUs use ``CPUMuon``. Under FSDP2 ``CPUMuon`` is used on
every device: it gathers each sharded matrix to orthogonalise it whole and applies this process's rows.
Update: momentum (Nesterov), orthogonalise with the quintic Newton-Schulz iteration of Keller Jordan's Muon,
scale to match AdamW's update RMS (0.2 * sqrt(max(rows, cols))), decoupled weight decay.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalise(
    grad: torch.Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration on a matrix or a stack of matrices (..., rows, cols), in ``dtype``
    (float32 on CPUs, bfloat16 on GPUs as ``torch.optim.Muon`` does)."""
    a, b, c = coefficients
    x = grad.to(dtype)
    stacked = x.dim() == 3
    if not stacked:
        x = x.unsqueeze(0)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if transposed:
        x = x.mT
    return x if stacked else x.squeeze(0)


class CPUMuon(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
    ):
        super().__init__(
            params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov}
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                scale = 0.2 * math.sqrt(max(p.size(0), p.size(1)))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                if hasattr(update, "full_tensor"):  # an FSDP2 shard: orthogonalise the whole matrix
                    whole = orthogonalise(update.full_tensor())
                    local = p.to_local()
                    mesh = p.device_mesh
                    mine = whole.chunk(mesh.size(), dim=0)[mesh.get_local_rank()] if whole.size(0) else whole
                    local.add_(mine[: local.size(0)].to(local.dtype), alpha=-group["lr"] * scale)
                    continue
                p.add_(orthogonalise(update).to(p.dtype), alpha=-group["lr"] * scale)


class BatchedMuon(torch.optim.Optimizer):
    """``torch.optim.Muon``'s update (bfloat16 Newton-Schulz, ``adjust_lr_fn="match_rms_adamw"``) for GPUs, with
    the matrices of one shape stacked and orthogonalised together by batched matrix products.

    ``torch.optim.Muon`` launches a few dozen small kernels per matrix from Python; a 16-layer model has 64
    hidden matrices but only 4 shapes. On one H100 the Muon step of config/speedrun.yaml took 16.7 ms instead
    of 37.4 (bench/results/step_time.txt). Same state (``momentum_buffer`` per parameter) and group keys, so
    checkpoints move between the two.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
    ):
        if adjust_lr_fn != "match_rms_adamw":
            raise ValueError("BatchedMuon implements adjust_lr_fn='match_rms_adamw' only")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon works on 2-D matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            for (shape, _, _), params in buckets.items():
                self._update(params, shape, group)

    def _update(self, params: list[torch.Tensor], shape: tuple[int, int], group: dict) -> None:
        lr, momentum = group["lr"], group["momentum"]
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        x = orthogonalise(torch.stack(updates), group["ns_steps"], group["eps"], torch.bfloat16,
                          group["ns_coefficients"])  # fmt: skip
        adjusted_lr = lr * 0.2 * math.sqrt(max(shape))
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, list(x.to(params[0].dtype).unbind(0)), alpha=-adjusted_lr)
