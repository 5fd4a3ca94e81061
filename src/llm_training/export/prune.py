"""Magnitude pruning before export: the smallest weights of the hidden matrices set to zero.

``torch.nn.utils.prune.l1_unstructured`` per matrix (each attention and MLP projection loses the same share)
or ``global_unstructured`` over all of them (the share varies by matrix); the mask is made permanent, so the
exported model holds plain tensors with zeros. Embeddings, the output head and norms are left alone: they
are few and pruning them costs far more quality. The report gives the sparsity reached, per matrix and
overall (of the pruned matrices and of all parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

from llm_training.errors import ConfigError
from llm_training.model.transformer import Transformer


@dataclass
class PruneReport:
    requested: float
    scope: str
    pruned_sparsity: float  # zeros / elements of the pruned matrices
    overall_sparsity: float  # zeros / all parameters
    per_matrix: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"requested": self.requested, "scope": self.scope, "pruned_sparsity": round(self.pruned_sparsity, 4),
                "overall_sparsity": round(self.overall_sparsity, 4),
                "per_matrix": {k: round(v, 4) for k, v in self.per_matrix.items()}}  # fmt: skip


def parse_pruning(spec) -> tuple[float, str] | None:
    """``False``/``None``/0: off; a number in (0, 1): that sparsity per matrix; ``True``: 0.5; a dict
    ``{'sparsity': 0.3, 'scope': 'layer' | 'global'}``."""
    if spec in (None, False, 0, "none", "off"):
        return None
    scope = "layer"
    if spec is True:
        amount = 0.5
    elif isinstance(spec, dict):
        unknown = set(spec) - {"sparsity", "scope", "method"}
        if unknown:
            raise ConfigError(f"pruning: unknown key {sorted(unknown)[0]!r}; valid: sparsity, scope, method")
        if spec.get("method", "magnitude") != "magnitude":
            raise ConfigError(f"pruning.method {spec['method']!r}: only 'magnitude' is supported")
        amount, scope = spec.get("sparsity", 0.5), spec.get("scope", "layer")
    else:
        amount = spec
    try:
        amount = float(amount)
    except (TypeError, ValueError):
        raise ConfigError(f"pruning: expected a sparsity between 0 and 1, got {amount!r}") from None
    if not 0 < amount < 1:
        raise ConfigError(f"pruning: sparsity must be between 0 and 1 (exclusive), got {amount}")
    if scope not in ("layer", "global"):
        raise ConfigError(f"pruning.scope {scope!r}: valid: layer, global")
    return amount, scope


def prunable(model: Transformer) -> list[tuple[str, nn.Linear]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("blocks.")
    ]


@torch.no_grad()
def magnitude_prune(model: Transformer, sparsity: float, scope: str = "layer") -> PruneReport:
    targets = prunable(model)
    if scope == "global":
        prune.global_unstructured([(m, "weight") for _, m in targets], prune.L1Unstructured, amount=sparsity)
    else:
        for _, module in targets:
            prune.l1_unstructured(module, "weight", amount=sparsity)
    for _, module in targets:
        prune.remove(module, "weight")
    per = {name: float((m.weight == 0).float().mean()) for name, m in targets}
    zeros = sum(int((m.weight == 0).sum()) for _, m in targets)
    size = sum(m.weight.numel() for _, m in targets)
    unique = list(model.parameters())  # a tied weight is listed once
    all_zeros = sum(int((p == 0).sum()) for p in unique)
    total = sum(p.numel() for p in unique)
    return PruneReport(sparsity, scope, zeros / max(1, size), all_zeros / max(1, total), per)
