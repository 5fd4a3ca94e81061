"""Supervised fine-tuning on chat data (prepared folders of kind ``"chat"``): language modelling's loss on the
assistant's tokens only, the model a plain language model (``model_kind`` ``"text"``), so evaluation, export,
inference and serving treat the result like any other checkpoint.

Batches are right-padded examples, or with ``finetune.packing`` windows of packed examples whose
``position_ids`` and ``segment_ids`` reach the model as keywords (``LanguageModelling.loss`` passes every
tensor of a batch): positions restart and attention stays inside each example, so each example's loss is
what it would be alone. The loss averages over trained tokens either way."""

from __future__ import annotations

from pathlib import Path

from llm_training.config import Config, TrainingConfig, finetune_max_length
from llm_training.data.chat import IGNORE_INDEX
from llm_training.data.chat_prepare import ChatDataset, PackedChatDataset
from llm_training.data.tokenizer import Tokenizer
from llm_training.model.generate import Sampling, generate_tokens
from llm_training.train.device import Runtime
from llm_training.train.objectives import LanguageModelling, training_window


class ChatSFT(LanguageModelling):
    """Examples right-padded to the window, or packed into windows; labels are -100 outside the assistant's
    replies (and their end-of-turn markup), so ``tokens`` and the loss count the replies alone."""

    @classmethod
    def from_data(cls, cfg: Config, data_dir: Path, manifest: dict) -> ChatSFT:
        if cfg.finetune.packing:
            window = packing_window(cfg)
            return cls(PackedChatDataset(data_dir / "train.json", window),
                       PackedChatDataset(data_dir / "validation.json", window))  # fmt: skip
        window = training_window(cfg)
        return cls(
            ChatDataset(data_dir / "train.json", window), ChatDataset(data_dir / "validation.json", window)
        )

    def sample(self, model, tokenizer: Tokenizer, runtime: Runtime, t: TrainingConfig) -> str:
        """The model's reply to the first validation example's prompt."""
        ids, labels = self.val_set.example(0)
        return reply_sample(model, tokenizer, runtime, t, ids, labels, self.val_set.end_of_turn_id)


def reply_sample(
    model, tokenizer: Tokenizer, runtime: Runtime, t: TrainingConfig, ids, labels, end_of_turn_id: int
) -> str:
    """The model's reply to an example's prompt: its ids up to the first trained label, which are the
    conversation rendered with the template's generation prompt; shown with the prompt's markup."""
    if t.sample_tokens == 0:
        return ""
    trained = (labels != IGNORE_INDEX).nonzero()[0]
    prompt = ids[: int(trained[0])].tolist() if len(trained) else ids.tolist()
    sampling = Sampling(t.sample_tokens, t.sample_temperature, t.sample_top_k, seed=t.seed)
    was_training = model.training
    model.eval()  # no dropout (LoRA's included) in the reply
    try:
        reply = generate_tokens(model, [prompt], sampling, eos_id=end_of_turn_id,
                                stop_ids=[[tokenizer.eot_id]], autocast=runtime.autocast)[0]  # fmt: skip
    finally:
        model.train(was_training)
    shown = tokenizer.backend.decode(prompt[-200:], skip_special_tokens=False)  # with its markup
    return f"{shown}{tokenizer.decode(reply)}"


def packing_window(cfg: Config) -> int:
    """Input tokens a packed window: ``training.seq_length`` when set, else the longest an example may be
    (``finetune.max_length``, by default the model's context up to 2048): not the context itself, which
    for an imported model (32,768 tokens for Qwen2.5) would make one window the size of many batches."""
    return cfg.training.seq_length or finetune_max_length(cfg)
