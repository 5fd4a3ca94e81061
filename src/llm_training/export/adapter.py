"""A LoRA fine-tuning as ``peft`` keeps it (``llm-export --format peft``): a folder holding ``base/``, the frozen
weights as a Hugging Face model folder (``hf.save_hf``), and ``adapter/``, the adapters as
``peft.PeftModel.from_pretrained`` loads them onto that base (``adapter_config.json`` and
``adapter_model.safetensors``, written by peft itself).

Our layers are fused where transformers' are not: one ``qkv`` for ``q_proj``/``k_proj``/``v_proj`` and, in the
Llama style, one ``up`` for ``gate_proj``/``up_proj``. A fused adapter splits exactly: the update is
``B @ A``, so each part keeps the shared ``A`` and takes its own rows of ``B`` (the rows ``hf_weights`` gives
the weight itself; no permutation, our rotary layout is transformers'). GPT-2's ``c_attn``, ``c_proj`` and
``c_fc`` are fused ``Conv1D`` layers in transformers too: their adapters go over whole, with peft's
``fan_in_fan_out``. The rank, alpha and dropout are the run's; ``target_modules`` the shortest names that
match exactly the adapted modules (``q_proj``, ``attn.c_proj``).

Embeddings that a template's new tokens made trainable are not adapters: they stay in the base, which then
has the grown vocabulary with the trained rows (as the checkpoint does), so the adapter loads onto
``base/``, not onto the model the fine-tuning started from. Without new tokens ``base/`` holds the starting
model's weights unchanged, and the adapter fits that model's own Hugging Face folder as well.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm_training.errors import UserError

BASE, ADAPTER = "base", "adapter"


def save_peft(checkpoint: Path, tokenizer, folder: Path, final: Path, chat_template: str | None) -> None:
    """Write ``folder/base`` and ``folder/adapter`` from the LoRA checkpoint ``checkpoint``; ``final`` is
    where ``folder`` will be moved (recorded as the adapter's ``base_model_name_or_path``)."""
    from llm_training.config import config_from_dict
    from llm_training.export.hf import save_hf
    from llm_training.model import build_model
    from llm_training.train.checkpoint import load_checkpoint
    from llm_training.train.lora import split_lora

    state = load_checkpoint(checkpoint)
    base_state, factors = split_lora(state["model"])
    finetune = state["config"].get("finetune") or {}
    if not factors:
        raise UserError(f"{checkpoint}: holds no LoRA adapters (not fine-tuned with --lora-rank); "
                        "export it with --format hf")  # fmt: skip
    config = config_from_dict({"model": state["config"]["model"]}, str(checkpoint))
    base = build_model(config)
    base.load_state_dict(base_state)
    del state, base_state
    save_hf(base.float().eval(), tokenizer, folder / BASE, chat_template=chat_template)
    del base
    _save_adapter(config.model, factors, finetune, folder, final)


def _save_adapter(cfg, factors: dict, finetune: dict, folder: Path, final: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from llm_training.export.hf_weights import hf_modules, hf_names, style_of

    parts = {}  # transformers' module -> (lora_A, lora_B)
    for layer, (a, b) in factors.items():
        modules = hf_modules(cfg, layer)
        if not modules:
            raise UserError(f"an adapter on {layer}, which has no transformers module to carry it")
        for module, rows in modules:
            parts[module] = (a, b if rows is None else b[rows[0] : rows[1]])
    every = {name.rsplit(".", 1)[0] for name in hf_names(cfg)}
    config = LoraConfig(
        r=int(finetune["lora_rank"]), lora_alpha=float(finetune["lora_alpha"]),
        lora_dropout=float(finetune.get("lora_dropout", 0.0)), target_modules=_target_names(set(parts), every),
        fan_in_fan_out=style_of(cfg) == "gpt2", bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    hf = _hf_model(folder / BASE)
    # where the base will be, not the staging folder: peft records it in the config and the model card
    final_base = str(Path(final).resolve() / BASE)
    hf.name_or_path = hf.config._name_or_path = final_base
    peft_model = get_peft_model(hf, config)
    inner = peft_model.base_model.model
    wrapped = {name for name, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    if wrapped != set(parts):  # the names must pick exactly the adapted modules, no more, no fewer
        raise UserError(f"peft wraps {sorted(wrapped ^ set(parts))[:3]} differently from the checkpoint's "
                        "adapters; export with --format hf (merged) instead")  # fmt: skip
    with torch.no_grad():
        for module, (a, b) in parts.items():
            target = inner.get_submodule(module)
            target.lora_A["default"].weight.copy_(a.float())
            target.lora_B["default"].weight.copy_(b.float())
    peft_model.peft_config["default"].base_model_name_or_path = final_base
    # "auto" would compare the vocabulary with the base's config, looked up on the Hub when the path does
    # not exist yet; no embedding is adapted here (grown rows live in the base)
    peft_model.save_pretrained(str(folder / ADAPTER), save_embedding_layers=False)


def _target_names(adapted: set[str], every: set[str]) -> list[str]:
    """For each adapted module the shortest name suffix (peft matches ``name == t`` or ``name.endswith("." +
    t)``) that picks adapted modules only: ``q_proj``, and GPT-2's ``attn.c_proj`` when ``mlp.c_proj`` is not
    adapted."""
    names = set()
    for module in adapted:
        parts = module.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(m in adapted for m in every if m == suffix or m.endswith("." + suffix)):
                break
        names.add(suffix)
    return sorted(names)


def _hf_model(folder: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(folder)).float().eval()


def load_peft(folder: str | Path):
    """``folder/base`` in transformers with ``folder/adapter`` on it through ``PeftModel.from_pretrained``:
    what the export's check runs."""
    from peft import PeftModel

    from llm_training.export.quiet import quiet

    folder = Path(folder)
    with quiet():  # transformers' deprecation notices that peft's calls raise
        return PeftModel.from_pretrained(_hf_model(folder / BASE), str(folder / ADAPTER)).eval()
