"""TorchScript: the model traced (``torch.jit.trace``) to a graph that ``torch.jit.load`` runs without this
package, with dynamic batch and sequence sizes; the model config and the tokenizer ride along as extra files
(``config.json``, ``tokenizer.json``) of the archive. Logits only: generation from it recomputes the sequence
at every token (use ONNX with past, or the checkpoint, for a KV cache).

PyTorch has deprecated TorchScript in favour of ``torch.export``; it still runs on 2.4 to 2.13, which is what
its users (C++ ``torch::jit::load``, older serving stacks) need.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from llm_training.model.transformer import Transformer


def export_torchscript(model: Transformer, path: Path, extra: dict[str, str]) -> None:
    model = model.eval()  # in its own dtype: an fp16 export is traced (and stored) in fp16
    ids = torch.randint(0, model.cfg.vocab_size, (2, min(8, model.cfg.max_seq_length)))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the deprecation and tracer warnings: checked by running it below
        traced = torch.jit.trace(model, (ids,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files=extra)


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """The module and its extra files (``config.json``, ``tokenizer.json`` when present)."""
    extra = {"config.json": "", "tokenizer.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items() if v}
