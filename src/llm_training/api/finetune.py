"""The fine-tuning job behind ``llm-finetune`` and ``Trainer.finetune``: load a pretrained model with its
tokenizer and chat template, prepare the chat data in that tokenizer, and train on the same engine as
``llm-train`` (``run_training_on``: sinks, checkpoints, resume, time budgets).

With ``--method dpo`` or ``simpo`` the data is preference pairs (``api/preference.py`` has that part).
The run's ``model.*`` config is the pretrained model's architecture and ``finetune.template`` the template's
text, so a checkpoint alone rebuilds the model (``--resume auto``, llm-evaluate, llm-export, llm-serve) and
a Hugging Face export carries the template.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from llm_training import __version__
from llm_training.config import Config, finetune_max_length, is_resolved_config, load_config, validate
from llm_training.data.chat_reply import folder_template, template_for
from llm_training.data.chat_template import ChatTemplate, load_chat_template
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import ConfigError, UserError
from llm_training.events import EventBus
from llm_training.fileio import check_output_file

PREPARED_CHAT = "prepared_chat"  # under the output folder, like the main job's prepared_data
PREPARED_PREFERENCE = "prepared_preference"  # pairs of --method dpo and simpo
# Fine-tuning moves pretrained weights a little: AdamW at a small learning rate with a short warm-up, no weight
# decay, one epoch. These sit above the built-in defaults (config/default.yaml is for training from scratch
# and is not read); a --config file, environment variables and flags override them.
FINETUNE_DEFAULTS = {
    "training.optimizer": "adamw",
    "training.learning_rate": 5e-5,
    "training.warmup_steps": 10,
    "training.weight_decay": 0.0,
    "training.min_lr_ratio": 0.1,
    "training.batch_size": 8,
    "training.eval_interval": 50,
    "training.sample_tokens": 64,
}


def finetune_config(config_file: str | Path | None = None, values: dict | None = None) -> Config:
    """The config of a fine-tuning run: ``FINETUNE_DEFAULTS`` < ``config_file`` < environment < ``values``."""
    fixed = sorted(k for k, v in (values or {}).items() if k.startswith("model.") and v is not None)
    if fixed:  # silently ignored otherwise: the architecture is the pretrained model's
        raise ConfigError(
            f"{fixed[0]}: a fine-tuned model keeps the architecture of --model; leave model.* unset"
        )
    return load_config(config_file, cli=values or {}, preset=FINETUNE_DEFAULTS, default_file=None)


def load_pretrained(path: str | Path) -> tuple[torch.nn.Module, Tokenizer, ChatTemplate | None]:
    """(model in fp32, its tokenizer, its own chat template or None) from a Hugging Face folder or a
    checkpoint of this project (``.pt``, whose config may hold the template of an earlier fine-tuning)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path} (give a Hugging Face model folder or a .pt checkpoint)")
    if path.is_dir():
        from llm_training.export.hf_import import load_hf

        model, tokenizer = load_hf(path)
        if tokenizer is None:
            raise UserError(f"{path}: no tokenizer.json; fine-tuning needs the model's own tokenizer")
        return model.float(), tokenizer, folder_template(path)
    from llm_training.train.artifacts import load_trained

    trained = load_trained(path)
    if getattr(trained.model, "vision_cfg", None) is not None:
        raise UserError(f"{path}: a text-and-image model; llm-finetune fine-tunes language models")
    text = trained.chat_template  # recorded by an earlier fine-tuning
    template = template_for(text, trained.tokenizer, str(path)) if text else None
    return trained.model.float(), trained.tokenizer, template


def choose_template(spec: str | None, own: ChatTemplate | None, model_path: str | Path) -> ChatTemplate:
    """``--chat-template`` when given, else the model's own; a base model without one is refused."""
    if spec:
        return load_chat_template(spec)
    if own is None:
        raise UserError(f"{model_path}: the model has no chat template; pass --chat-template chatml "
                        "(or a .jinja file) to format the conversations")  # fmt: skip
    return own


def grow_vocab(model, size: int):
    """``model`` with ``size`` embedding (and head) rows: new tokens (a template's markup) start at the mean
    of the existing rows, a neutral guess that the fine-tuning then moves."""
    cfg = dataclasses.replace(model.cfg, vocab_size=size)
    state = dict(model.state_dict())
    for name in ("embed.weight", "lm_head.weight"):
        old = state[name]
        state[name] = torch.cat([old, old.mean(0, keepdim=True).expand(size - len(old), -1)])
    return type(model).from_state(cfg, state)


def prepare_chat_data(
    cfg: Config, data_file: str | Path, tokenizer: Tokenizer, template: ChatTemplate
) -> tuple[Path, str]:
    """(``<output_dir>/prepared_chat``, or ``prepared_preference`` for pairs, a line saying what was done):
    prepared from ``data_file`` unless it already holds the same data."""
    from llm_training.api.preference import is_preference
    from llm_training.data.chat_prepare import ChatPrepareOptions, prepare_chat
    from llm_training.data.preference_prepare import prepare_preference
    from llm_training.data.prepare import existing_fingerprint, fingerprint_of

    f, d = cfg.finetune, cfg.data
    if not Path(data_file).is_file():
        raise UserError(f"data file not found: {data_file}")
    stat = os.stat(data_file)
    if (f.max_length or 0) > cfg.model.max_seq_length:
        raise ConfigError(f"finetune.max_length ({f.max_length}) is longer than the model's context "
                          f"({cfg.model.max_seq_length})")  # fmt: skip
    max_length = finetune_max_length(cfg)
    settings = [max_length, f.truncation, f.train_on_prompt, d.validation_fraction, d.seed]
    fingerprint = fingerprint_of(__version__, Path(data_file).resolve(), stat.st_size, stat.st_mtime_ns,
                                 tokenizer.fingerprint, template.source, template.special_tokens, settings)  # fmt: skip
    pairs = is_preference(cfg)
    target = Path(cfg.output_dir) / (PREPARED_PREFERENCE if pairs else PREPARED_CHAT)
    what = "preference pairs" if pairs else "examples"
    if existing_fingerprint(target) == fingerprint:
        return target, f"re-used the prepared {'preference' if pairs else 'chat'} data in {target}"
    options = ChatPrepareOptions(max_length, f.truncation, f.train_on_prompt, d.validation_fraction, d.seed,
                                 fingerprint)  # fmt: skip
    prepare = prepare_preference if pairs else prepare_chat
    enc = prepare(data_file, target, tokenizer, template, options)["encoding"]
    dropped = enc["dropped_too_long"] + enc["dropped_untrainable"]
    return target, (f"prepared {enc['kept']:,} of {enc['examples']:,} {what} into {target} ({enc['truncated']:,} "
                    f"truncated, {dropped:,} dropped): {enc['tokens']:,} tokens, {enc['trained_tokens']:,} trained")  # fmt: skip


def run_finetune(
    cfg: Config,
    model_path: str | Path,
    data_file: str | Path,
    resume_from: str | Path | None = None,
    *,
    console: bool = True,
    bus: EventBus | None = None,
):
    """Fine-tune the model at ``model_path`` on the chat file ``data_file`` (preference pairs for dpo and
    simpo); returns the run's TrainResult."""
    from llm_training.api.jobs import run_training_on
    from llm_training.api.preference import (
        cache_reference,
        is_preference,
        preference_note,
        ready_for_preference,
    )
    from llm_training.data.chat import add_template_tokens

    # before anything is read or written: the run's config.yaml may replace only an earlier run's
    check_output_file(Path(cfg.output_dir) / "config.yaml", "--output-dir's", ours=is_resolved_config)
    model, tokenizer, own = load_pretrained(model_path)
    template = choose_template(cfg.finetune.chat_template, own, model_path)
    notes = []  # what this job did besides training, for the summary
    added = add_template_tokens(tokenizer, template) if template.tokens else []
    if tokenizer.vocab_size > model.cfg.vocab_size:
        model = grow_vocab(model, tokenizer.vocab_size)
        notes.append(
            f"added {', '.join(added)} to the tokenizer and the embeddings ({tokenizer.vocab_size:,} rows)"
        )
    if is_preference(cfg):
        model = ready_for_preference(cfg, model)
    cfg.model = dataclasses.replace(model.cfg)
    cfg.finetune.template = template.source
    validate(cfg)
    f = cfg.finetune
    from llm_training.api.resources import ComputeResourceManager
    from llm_training.train.distributed import computed_once

    # Several processes (torchrun, llm-finetune --num-gpus): the group is joined before the data, which rank
    # 0 prepares (or re-uses) while the others wait, so no two write the folder (see api/finetune_launch.py);
    # DPO's reference log-probs likewise
    with ComputeResourceManager(None, cfg.resources) as env:
        data_dir, prepared = computed_once(
            env, lambda: prepare_chat_data(cfg, data_file, tokenizer, template)
        )
        notes.insert(0, prepared)
        if f.method == "dpo":  # by the starting model, before any adapter is added
            progress = console and cfg.logging.progress_bar

            def reference() -> tuple[str, str | None]:
                return cache_reference(cfg, model, data_dir, progress), cfg.finetune.reference

            line, cfg.finetune.reference = computed_once(env, reference)
            notes.insert(1, line)
        if f.packing:
            from llm_training.data.chat_prepare import PackedChatDataset
            from llm_training.train.sft import packing_window

            notes.append(PackedChatDataset(data_dir / "train.json", packing_window(cfg)).describe())
        # adapters start from the run's seed, whatever ran before in this process (Trainer.finetune), and so
        # are the same in every process (FSDP2 does not broadcast)
        torch.manual_seed(cfg.training.seed)
        if f.qlora:  # 4-bit base weights under the adapters (implies LoRA)
            from llm_training.train.qlora import add_qlora

            notes.append(add_qlora(model, cfg, bool(added)))
        elif f.lora_rank:  # after any growth: new rows then train with the adapters
            from llm_training.train.lora import add_lora

            trainable = add_lora(
                model, f.lora_rank, f.lora_alpha, f.lora_dropout, f.lora_targets, bool(added)
            )
            notes.append(f"LoRA rank {f.lora_rank} on {f.lora_targets}: {trainable:,} of "
                         f"{model.num_parameters():,} parameters trained; every reader of the checkpoints "
                         "merges the adapters")  # fmt: skip
        result = run_training_on(cfg, data_dir, resume_from, model=model, console=console, bus=bus)
    result.notes = [*notes, *getattr(result, "notes", [])]
    if note := preference_note(result.metrics or {}):
        result.notes.append(note)
    return result
