"""What a run trains: an objective owns its data, the model it trains, how a micro-batch becomes a loss, the
sample shown at the end and the ``model_kind`` a checkpoint records. The loop and ``train_step`` only call it.

Language modelling on prepared text is here; others (captions of images in ``multimodal/objective.py``, chat
SFT in ``train/sft.py``, preference pairs in ``train/preference.py``) are chosen by the prepared data's kind
in ``train/setup.py``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Protocol

import torch

from llm_training.config import Config, TrainingConfig
from llm_training.data.loader import TokenDataset
from llm_training.data.tokenizer import Tokenizer
from llm_training.model import build_model
from llm_training.model.generate import Sampling, generate_tokens
from llm_training.train.device import Runtime


class Objective(Protocol):
    """The interface the loop, ``train_step`` and ``evaluate_loss`` use. The datasets give
    ``num_windows``, ``num_tokens``, ``seq_len``, ``bytes_per_token`` and ``batch(indices)`` (a dict of
    tensors on the host, one row an item).

    Optional, for validation figures besides the loss: ``measure(model, batch, runtime)`` -> (the loss, a
    dict of device scalars summed over the split) and ``figures(sums, counted, val_set)`` -> the figures
    (``val_*`` keys) made of those sums, added to or replacing validation's own."""

    model_kind: str  # recorded in checkpoints: how to rebuild the model
    train_set: Any
    val_set: Any

    @classmethod
    def from_data(cls, cfg: Config, data_dir: Path, manifest: dict) -> Objective:
        """The objective over the prepared folder ``data_dir`` (``manifest``: its train.json), its datasets
        open and any state of its own ready (a frozen reference model, say)."""
        ...

    def build_model(self, cfg: Config) -> torch.nn.Module:
        """The model this objective trains, fresh from the config."""
        ...

    def tokens(self, batch: dict) -> torch.Tensor:
        """How many targets ``loss`` averages over in ``batch``, on the batch's device (no host sync): the
        weights of accumulated micro-batches and of validation sums. Known before the forward pass."""
        ...

    def loss(self, model, batch: dict, runtime: Runtime, non_blocking: bool = False) -> torch.Tensor:
        """The mean loss of ``batch`` under ``model`` (the forward pass, under the runtime's autocast)."""
        ...

    def sample(self, model, tokenizer: Tokenizer, runtime: Runtime, t: TrainingConfig) -> str:
        """What the end of a run shows of the trained model."""
        ...


class LanguageModelling:
    """Next-token prediction on windows of prepared text; labels of -100 are not counted."""

    model_kind = "text"

    def __init__(self, train_set=None, val_set=None) -> None:
        self.train_set, self.val_set = train_set, val_set

    @classmethod
    def from_data(cls, cfg: Config, data_dir: Path, manifest: dict) -> LanguageModelling:
        window = training_window(cfg)
        return cls(
            TokenDataset(data_dir / "train.json", window), TokenDataset(data_dir / "validation.json", window)
        )

    def build_model(self, cfg: Config) -> torch.nn.Module:
        return build_model(cfg)

    def tokens(self, batch: dict) -> torch.Tensor:
        return (batch["labels"] != -100).sum()

    def loss(self, model, batch: dict, runtime: Runtime, non_blocking: bool = False) -> torch.Tensor:
        """``input_ids`` and ``labels``, and any other tensors of the batch (the images of a text-and-image
        model) passed to the model as keywords."""
        moved = {k: v.to(runtime.device, non_blocking=non_blocking) for k, v in batch.items()}
        input_ids, labels = moved.pop("input_ids"), moved.pop("labels")
        with runtime.autocast():
            return model(input_ids, labels, **moved)

    def sample(self, model, tokenizer: Tokenizer, runtime: Runtime, t: TrainingConfig) -> str:
        return sample_text(model, tokenizer, runtime, t.sample_prompt, t.sample_tokens, t.sample_temperature,
                           t.sample_top_k, t.seed)  # fmt: skip


def training_window(cfg: Config) -> int:
    """Tokens a training window: ``training.seq_length``, else the model's context."""
    return cfg.training.seq_length or cfg.model.max_seq_length


def sample_text(
    model,
    tokenizer: Tokenizer,
    runtime: Runtime,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
) -> str:
    if max_tokens == 0:
        return ""
    eot = tokenizer.eot_id
    sampling = Sampling(max_tokens, temperature, top_k, seed=seed)
    if prompt:  # its continuation, to its end-of-text
        new = generate_tokens(
            model, [tokenizer.encode(prompt)], sampling, eos_id=eot, autocast=runtime.autocast
        )
        return prompt + tokenizer.decode(new[0])
    # after an empty prompt a model may end the document at once (a few percent of the time): generation
    # goes on past end-of-text, and the first document with text is shown rather than an empty sample
    new = generate_tokens(model, [[eot]], sampling, autocast=runtime.autocast)[0]
    documents = (
        tokenizer.decode(list(ids)) for is_eot, ids in itertools.groupby(new, eot.__eq__) if not is_eot
    )
    return next((text for text in documents if text.strip()), "")
