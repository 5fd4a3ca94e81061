"""``llm-evaluate`` of a text-and-image checkpoint on captions with images: caption loss, perplexity, bits per
byte, and how often the greedy caption is exactly the reference."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from llm_training.errors import UserError


def evaluate_captions(
    checkpoint: str | Path, test_file: str | Path, batch_size: int = 16, device: str = "auto"
) -> dict:

    from llm_training.multimodal.data import CaptionDataset, ImageTextOptions, prepare_image_text
    from llm_training.train.artifacts import load_trained
    from llm_training.train.device import Runtime, pick_device
    from llm_training.train.validation import evaluate_loss

    target = pick_device(device)
    trained = load_trained(checkpoint, target)
    if getattr(trained.model, "vision_cfg", None) is None:
        raise UserError(f"{checkpoint} is a language model; {test_file} holds captions with images")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llm-eval-captions-") as tmp:
        vocab = Path(tmp) / "vocab.json"
        trained.tokenizer.save(vocab)  # the checkpoint's own tokenizer, so the ids are the model's
        options = ImageTextOptions(tokenizer=str(vocab), image_size=trained.config.vision.image_size,
                                   validation_fraction=1.0, on_error="skip")  # fmt: skip
        report = prepare_image_text(test_file, Path(tmp) / "data", options)
        data = CaptionDataset(Path(tmp) / "data" / "validation.json", trained.config.model.max_seq_length)
        runtime = Runtime(target, "bf16" if target.type == "cuda" else "fp32", False)
        figures = evaluate_loss(trained.model, data, runtime, batch_size)
        hits = 0
        for first in range(0, data.num_windows, batch_size):
            indices = list(range(first, min(first + batch_size, data.num_windows)))
            batch = data.batch(indices)
            with runtime.autocast():
                made = trained.model.caption(batch["images"].to(target), data.eot_id, data.seq_len)
            for row, labels in zip(made, batch["labels"].tolist(), strict=True):
                hits += row == [t for t in labels if t != -100][:-1]
    return {
        "model": str(checkpoint), "step": trained.step, "test_data": str(test_file), "pairs": data.num_windows,
        "skipped": report["skipped"], "caption_loss": round(figures["val_loss"], 6),
        "perplexity": round(figures["val_perplexity"], 6), "bits_per_byte": round(figures["val_bpb"], 6),
        "caption_exact_match": round(hits / data.num_windows, 6), "seconds": round(time.perf_counter() - start, 3),
    }  # fmt: skip
