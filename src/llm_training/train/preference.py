"""Preference tuning on pairs of replies (prepared folders of kind ``"preference"``): DPO and SimPO.

DPO (Rafailov et al., 2023): loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), where pi and ref
are the summed log-probs of the chosen (c) and rejected (r) reply's tokens under the model being trained and
under the starting model. The starting model's are computed once before training (``score_pairs``, cached
beside the prepared data), so no second model is held while training and the loss at step 0 is ln 2.

SimPO (Meng et al., 2024) is the reference-free variant offered: loss = -log sigmoid(beta * (avg_c - avg_r) -
gamma), with avg the reply's log-prob per token. It was chosen over ORPO because it is a pure preference loss
on the same pair forward pass (ORPO adds an SFT term and its weight), scores above ORPO in the SimPO paper's
benchmarks, and its length normalisation keeps long rejected replies from winning by length alone. Defaults
from the paper's code: beta 2.0, gamma = beta / 2 (its ``gamma_beta_ratio`` of 0.5).

Both sides of every pair go through the model in one forward pass (2 x pairs rows). The model is a plain
language model (``model_kind`` ``"text"``): evaluation, export and serving treat the result like any other.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llm_training.config import Config, TrainingConfig
from llm_training.data.chat import IGNORE_INDEX
from llm_training.data.preference_prepare import REFERENCE_FILE, PreferenceDataset, load_reference
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import DataError
from llm_training.model import build_model
from llm_training.train.device import Runtime
from llm_training.train.objectives import training_window
from llm_training.train.sft import reply_sample

DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}
SIMPO_GAMMA_BETA_RATIO = 0.5
NEEDS_REFERENCE = ("dpo",)


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, runtime: Runtime):
    """(summed log-probs of the labelled tokens, how many there are), one per row of ``input_ids``
    (rows, width); labels are the next tokens, -100 where not scored. Log-probs in float32."""
    with runtime.autocast():
        logits = model(input_ids)
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.view(labels.shape).sum(-1), (labels != IGNORE_INDEX).sum(-1)


@torch.no_grad()
def score_pairs(model, dataset: PreferenceDataset, runtime: Runtime, batch_size: int, on_progress=None):
    """(pairs, 2) float32 array of every pair's chosen and rejected summed log-probs under ``model`` (in
    eval mode: no dropout), batched as training batches them. ``on_progress(pairs)`` after each batch."""
    out = np.zeros((dataset.num_windows, 2), np.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, dataset.num_windows, batch_size):
            indices = list(range(start, min(dataset.num_windows, start + batch_size)))
            batch = dataset.batch(indices)
            ids, labels = (batch[k].to(runtime.device).flatten(0, 1) for k in ("input_ids", "labels"))
            logps, _ = sequence_logps(model, ids, labels, runtime)
            out[indices] = logps.view(-1, 2).cpu().numpy()
            if on_progress is not None:
                on_progress(len(indices))
    finally:
        model.train(was_training)
    return out


class PreferenceTuning:
    """The objective of preference pairs: DPO or SimPO (``finetune.method``); the loss is the mean over pairs
    and ``tokens`` counts pairs. Validation adds the reward accuracy (pairs whose chosen reply's reward is
    above the rejected one's) and the mean reward margin; its perplexity and bits per byte are the chosen
    replies'."""

    model_kind = "text"

    def __init__(self, train_set, val_set, method: str = "dpo", beta: float | None = None,
                 gamma: float | None = None) -> None:  # fmt: skip
        self.train_set, self.val_set, self.method = train_set, val_set, method
        self.beta = DEFAULT_BETA[method] if beta is None else beta
        if method == "simpo":
            self.gamma = self.beta * SIMPO_GAMMA_BETA_RATIO if gamma is None else gamma
        else:
            self.gamma = 0.0

    @classmethod
    def from_data(cls, cfg: Config, data_dir: Path, manifest: dict) -> PreferenceTuning:
        f = cfg.finetune
        if f.method not in DEFAULT_BETA:
            raise DataError(
                f"{data_dir}: preference pairs train with finetune.method dpo or simpo, not {f.method!r}"
            )
        reference = {"train": None, "validation": None}
        if f.method in NEEDS_REFERENCE:
            cached = load_reference(data_dir)
            if cached is None or not f.reference or cached[0] != f.reference:
                raise DataError(f"{data_dir / REFERENCE_FILE}: no reference log-probs of this run's starting "
                                "model; llm-finetune --method dpo computes them before training")  # fmt: skip
            reference = cached[1]
        window = training_window(cfg)
        sets = [
            PreferenceDataset(data_dir / f"{s}.json", window, reference[s]) for s in ("train", "validation")
        ]
        return cls(*sets, method=f.method, beta=f.beta, gamma=f.gamma)

    def build_model(self, cfg: Config) -> torch.nn.Module:
        return build_model(cfg)

    def tokens(self, batch: dict) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0])

    def loss(self, model, batch: dict, runtime: Runtime, non_blocking: bool = False) -> torch.Tensor:
        return self._forward(model, batch, runtime, non_blocking)[0]

    def measure(self, model, batch: dict, runtime: Runtime, non_blocking: bool = False):
        """(mean loss of the batch's pairs, sums of the figures validation reports)."""
        loss, margin, logps, counts = self._forward(model, batch, runtime, non_blocking)
        margin = margin.detach()
        sums = {"correct": (margin > 0).sum().double(), "margin": margin.double().sum(),
                "chosen_nll": -logps[:, 0].detach().double().sum(), "chosen_tokens": counts[:, 0].sum().double()}  # fmt: skip
        return loss, sums

    def _forward(self, model, batch: dict, runtime: Runtime, non_blocking: bool):
        """(mean loss, reward margins, summed log-probs and trained tokens per pair and side): a training
        step needs the loss alone, validation the rest too."""
        ids, labels = (batch[k].to(runtime.device, non_blocking=non_blocking).flatten(0, 1)
                       for k in ("input_ids", "labels"))  # fmt: skip
        logps, counts = sequence_logps(model, ids, labels, runtime)
        logps, counts = logps.view(-1, 2), counts.view(-1, 2)
        if self.method == "simpo":
            rewards = self.beta * logps / counts.clamp(min=1)
        else:
            reference = batch["reference"].to(runtime.device, non_blocking=non_blocking)
            rewards = self.beta * (logps - reference)
        margin = rewards[:, 0] - rewards[:, 1]
        return -F.logsigmoid(margin - self.gamma).mean(), margin, logps, counts

    def figures(self, sums: dict[str, float], pairs: int, dataset: PreferenceDataset) -> dict[str, float]:
        """Validation figures from the sums over the split: reward accuracy and mean margin over pairs;
        perplexity and bits per byte of the chosen replies' tokens."""
        nll = sums["chosen_nll"] / max(1.0, sums["chosen_tokens"])
        return {
            "val_reward_accuracy": sums["correct"] / max(1, pairs),
            "val_margin": sums["margin"] / max(1, pairs),
            "val_perplexity": math.exp(min(nll, 50.0)),
            "val_bpb": nll / math.log(2) / dataset.bytes_per_token,
        }

    def sample(self, model, tokenizer: Tokenizer, runtime: Runtime, t: TrainingConfig) -> str:
        """The model's reply to the first validation pair's prompt."""
        ids, labels = self.val_set.example(0)
        return reply_sample(model, tokenizer, runtime, t, ids, labels, self.val_set.end_of_turn_id)
