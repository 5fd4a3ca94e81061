"""Evaluating a checkpoint: what ``llm-evaluate``, ``llm-compare`` and ``Trainer.evaluate`` compute."""

from __future__ import annotations

import time
from pathlib import Path

from llm_training.errors import ConfigError, UserError
from llm_training.eval.data import ChatSet, ChoiceSet, TextSet, read_test_data
from llm_training.eval.metrics import evaluate_model, parse_metrics, score_tokens, text_metrics


def default_metrics(data: TextSet | ChoiceSet | ChatSet) -> list[str]:
    """Every metric that the kind of data supports."""
    return parse_metrics(
        "loss,perplexity,bits_per_byte,accuracy" + ("" if isinstance(data, (TextSet, ChatSet)) else ",f1")
    )


def evaluate_checkpoint(
    model_path: str | Path,
    test_data: str | Path | TextSet | ChoiceSet | ChatSet,
    metrics: str | list[str] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    model_format: str | None = None,
    units: bool = False,
    chat_template: str | None = None,
) -> dict:
    """The metrics of one checkpoint; ``test_data`` a path or data already read (to read a file once for
    several models); ``metrics`` None: ``default_metrics``; ``model_format`` None: by the model's name;
    ``units``: with the scores per block of text or per item (``evaluate_model``), for ``llm-compare``'s
    noise estimate; ``chat_template``: renders chat data instead of the model's own template."""
    import torch

    from llm_training.export.runtime import load_model
    from llm_training.train.device import pick_device

    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if isinstance(test_data, (str, Path)):
        from llm_training.multimodal.data import is_image_text

        if is_image_text(test_data):  # captions with images: the text-and-image evaluation
            from llm_training.multimodal.evaluate import evaluate_captions

            return evaluate_captions(model_path, test_data, batch_size, device)
    data = read_test_data(test_data) if isinstance(test_data, (str, Path)) else test_data
    names = parse_metrics(metrics) if metrics is not None else default_metrics(data)
    target = pick_device(device)  # bad data and metric names fail above, before the model is loaded
    trained = load_model(model_path, target, model_format)
    if getattr(trained.module, "vision_cfg", None) is not None:
        raise UserError(f"{model_path} reads an image before its text: evaluate it on captions with images "
                        '(JSON Lines of {"text": ..., "image": ...})')  # fmt: skip
    # evaluation keeps fp32 weights and computes under bf16 autocast where the device prefers it
    template = None
    if isinstance(data, ChatSet):
        from llm_training.eval.chat import model_template

        template = model_template(trained, chat_template)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if trained.prefers_bf16 else None
    start = time.perf_counter()
    results = evaluate_model(
        trained.module, trained.tokenizer, data, names, batch_size, autocast, units, template
    )
    return {"model": str(model_path), "step": trained.step, "test_data": data.source, **results,
            "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip


def evaluate_prepared(
    model_path: str | Path,
    data_dir: str | Path,
    metrics: str | list[str] | None = None,
    batch_size: int = 16,
    device: str = "auto",
) -> dict:
    """Plain-text metrics of a model on the validation split of prepared data (its token shards, read as
    they are: no text is tokenized again); bits per byte from the manifest's byte count."""
    import numpy as np

    from llm_training.data.loader import TokenDataset
    from llm_training.export.runtime import load_model
    from llm_training.train.device import pick_device

    names = parse_metrics(metrics)
    manifest = Path(data_dir) / "validation.json"
    loaded = load_model(model_path, pick_device(device))
    data = TokenDataset(manifest, loaded.cfg.max_seq_length)
    stream = np.concatenate(data.shards, dtype=np.int64)  # one copy of the memory-mapped shards
    start = time.perf_counter()
    s = score_tokens(loaded.module, stream, batch_size)
    values = text_metrics(s, s["tokens"] * data.bytes_per_token)
    return {"model": str(model_path), "step": loaded.step, "test_data": str(manifest), "data_kind": "prepared",
            "tokens": s["tokens"], **{m: values[m] for m in names}, "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
