"""LoRA: low-rank adapters trained beside frozen weights (through ``peft``), and their merge into the
weights they adapt.

Checkpoints of a LoRA run hold peft's names (``<layer>.base_layer.weight``, ``<layer>.lora_A.default.weight``,
``<layer>.lora_B.default.weight``) so that ``--resume`` continues exactly; every reader of a checkpoint
(``load_trained``: evaluation, export, inference, serving) folds the factors into the weights with
:func:`merged_state`, in plain PyTorch, and sees the usual model.
"""

from __future__ import annotations

import torch

TARGETS = ("qkv", "proj", "up", "down")  # the linear layers of a block (lm_head: also allowed)


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: str,
             train_embeddings: bool = False) -> int:  # fmt: skip
    """Wrap ``targets`` (comma-separated layer names) of ``model`` in adapters of ``rank``, in place; every
    other weight is frozen, except the embeddings and head when ``train_embeddings`` (rows a template added
    must learn). Returns the number of trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    names = target_names(targets, model.cfg.tie_embeddings)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name or (
            train_embeddings and name in ("embed.weight", "lm_head.weight")
        )
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def split_lora(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """(the frozen weights under the adapted layers' own names, ``{layer: (lora_A, lora_B)}``) of a
    checkpoint's model state; a state without adapters gives itself and no factors."""
    base, factors = {}, {}
    for name, value in state.items():
        if ".lora_A." in name:
            layer = name.split(".lora_A.")[0]
            factors[layer] = (value, state[name.replace(".lora_A.", ".lora_B.")])
        elif ".lora_" not in name:
            base[name.replace(".base_layer.", ".")] = value
    return base, factors


def target_names(targets: str, tied_embeddings: bool) -> list[str]:
    """The layer names of ``targets`` (comma-separated), checked against the model (``tied_embeddings``)."""
    from llm_training.errors import ConfigError

    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = sorted(set(names) - {*TARGETS, "lm_head"})
    if unknown or not names:
        raise ConfigError(f"finetune.lora_targets: {', '.join(unknown) or 'none given'}; "
                          f"choose from {', '.join((*TARGETS, 'lm_head'))}")  # fmt: skip
    if "lm_head" in names and tied_embeddings:  # one tensor cannot be adapted in one role only
        raise ConfigError(
            "finetune.lora_targets: lm_head is tied to the embeddings in this model; leave it out"
        )
    return names


def merged_state(state: dict[str, torch.Tensor], finetune: dict | None) -> dict[str, torch.Tensor]:
    """A checkpoint's model state with any LoRA factors folded in: W + (alpha / rank) * B @ A, under the
    adapted layer's own names. A state without adapters is returned as it is."""
    if not any(".lora_A." in name for name in state):
        return state
    scaling = float(finetune["lora_alpha"]) / int(finetune["lora_rank"])
    base, factors = split_lora(state)
    for layer, (a, b) in factors.items():
        value = base[f"{layer}.weight"]
        base[f"{layer}.weight"] = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
    return base
