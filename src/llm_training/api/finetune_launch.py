"""What ``llm-finetune --num-gpus N`` does in the launcher's parent before any worker starts: every check of
the inputs, and the data prepared once, from the model's tokenizer, template and architecture alone (its
weights are not read: each worker loads them).

Why the parent prepares: a bad model folder, template, data file or record is then one line and exit status
2, not one error a process, and the workers find the folder ready (``prepare_chat_data`` re-uses a folder
whose fingerprint matches). Under ``torchrun``, where no parent of ours runs, rank 0 prepares while the
others wait (``run_finetune``); under ``--num-gpus`` rank 0 then only re-uses this preparation.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from llm_training.config import Config, ModelConfig, config_from_dict, is_resolved_config, validate
from llm_training.data.chat_template import ChatTemplate
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import UserError
from llm_training.fileio import check_output_file


def read_pretrained(path: str | Path) -> tuple[ModelConfig, Tokenizer, ChatTemplate | None]:
    """(architecture, tokenizer, own chat template or None) of a Hugging Face folder or a checkpoint of this
    project, as ``load_pretrained`` finds them, without reading the weights."""
    from llm_training.api.finetune import load_pretrained
    from llm_training.data.chat_reply import folder_template, template_for

    path = Path(path)
    if path.is_dir():
        from llm_training.export.hf_import import hf_architecture

        cfg, _ = hf_architecture(path)
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"{path}: no tokenizer.json; fine-tuning needs the model's own tokenizer")
        return cfg, Tokenizer.load(path / "tokenizer.json"), folder_template(path)
    state = None
    if path.is_file():
        try:  # memory-mapped: the tensors are not read
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            state = None
    usable = (
        isinstance(state, dict)
        and isinstance(state.get("config"), dict)
        and state.get("tokenizer_json")
        and state.get("model_kind", "text") == "text"
    )
    if not usable:  # missing, damaged, not ours, a text-and-image model: the full load says which in one line
        model, tokenizer, template = load_pretrained(path)
        return model.cfg, tokenizer, template
    cfg = config_from_dict({"model": state["config"]["model"]}, str(path)).model
    tokenizer = Tokenizer.from_json(state["tokenizer_json"])
    text = (state["config"].get("finetune") or {}).get("template")
    template = template_for(text, tokenizer, str(path)) if text else None
    return cfg, tokenizer, template


def prepare_before_launch(
    cfg: Config, model_path: str | Path, data_file: str | Path, resume=None, prepare: bool = True
) -> str | None:
    """Check everything the workers would check first and prepare ``data_file`` into the run's folder, as
    ``run_finetune`` does, in this process; returns the preparation's line (None when the workers prepare:
    ``prepare`` false, or another method's data). ``cfg`` gets the model's architecture, like a worker's."""
    from llm_training.api.finetune import choose_template, prepare_chat_data
    from llm_training.api.jobs import check_checkpoints_fit
    from llm_training.data.chat import add_template_tokens

    check_output_file(Path(cfg.output_dir) / "config.yaml", "--output-dir's", ours=is_resolved_config)
    if resume is not None and str(resume) != "auto" and not Path(resume).is_file():
        raise UserError(f"checkpoint not found: {resume} (give a .pt file, or --resume auto)")
    model_cfg, tokenizer, own = read_pretrained(model_path)
    template = choose_template(cfg.finetune.chat_template, own, model_path)
    if template.tokens:
        add_template_tokens(tokenizer, template)
    cfg.model = dataclasses.replace(model_cfg, vocab_size=max(model_cfg.vocab_size, tokenizer.vocab_size))
    cfg.finetune.template = template.source
    validate(cfg)
    f = cfg.finetune
    if f.lora_rank:
        import peft  # noqa: F401  (missing: one line naming the extra that installs it)

        from llm_training.train.lora import target_names

        target_names(f.lora_targets, cfg.model.tie_embeddings)
    if not prepare or f.method != "sft":  # rank 0 prepares it, the others waiting
        if not Path(data_file).is_file():
            raise UserError(f"data file not found: {data_file}")
        return None
    data_dir, line = prepare_chat_data(cfg, data_file, tokenizer, template)
    check_checkpoints_fit(cfg, data_dir, resume)
    return line
