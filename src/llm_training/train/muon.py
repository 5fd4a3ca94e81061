"""Muon for CPUs: the same update as ``torch.optim.Muon`` with the Newton-Schulz iteration in float32.

``torch.optim.Muon`` orthogonalises in bfloat16, which is fast on GPUs and slow on most CPUs (about 15x
slower per step in our 2-core measurements); on CUDA the loop uses PyTorch's class, on CPUs (and with
PyTorch before 2.9, which has no Muon) this one; also under FSDP2, where it gathers each sharded matrix to
orthogonalise it whole and applies this process's rows.
Update: momentum (Nesterov), orthogonalise with the quintic Newton-Schulz iteration of Keller Jordan's Muon,
scale to match AdamW's update RMS (0.2 * sqrt(max(rows, cols))), decoupled weight decay.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalise(grad: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    x = grad.float()
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


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
