"""Any model this tool writes, loaded for inference: a training checkpoint, or an export (ONNX, TorchScript,
safetensors, a Hugging Face folder, GGUF), recognised by its name (or named by the caller: ``--format``).

A ``.pt`` file is always a checkpoint of this tool, read with ``weights_only``: TorchScript runs code when it
is loaded, so it is loaded only under a TorchScript name (``.torchscript.pt``, as the exporter writes, or
``.torchscript``/``.ts``) or when the caller says ``torchscript``, never because of what a file contains.

``load_model(path)`` returns a ``LoadedModel``: the tokenizer, the model config, the chat template where
the format carries one (a checkpoint of a chat fine-tuning, a Hugging Face folder, GGUF), and ``module``, an
``nn.Module`` whose ``forward(input_ids)`` returns logits. For checkpoints, safetensors, Hugging Face folders
and GGUF that is our ``Transformer`` itself (generation gets the KV cache); ONNX and TorchScript are wrapped
(``RuntimeModule``) so that evaluation code treats them alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llm_training.config import ModelConfig, model_config_from_json
from llm_training.data.chat_template import ChatTemplate
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import UserError
from llm_training.export.hf import read_json_object

log = logging.getLogger("llm_training.export")


class RuntimeModule(nn.Module):
    """A foreign runtime (onnxruntime, a TorchScript graph) behind ``forward(input_ids) -> logits`` (CPU
    tensors in and out), with the generation protocol of ``Transformer.forward(ids, cache=KVCache)``:

    - ONNX with past keys and values: the cache's validity mask is the graph's ``attention_mask`` and the
      graph's present tensors are kept on the cache object for the next step;
    - graphs without a past (TorchScript, ONNX exported with ``--no-past``): each row's real tokens are kept
      on the cache and the row is recomputed whole, without its padding (correct, and as slow as generation
      without a cache is).
    """

    def __init__(self, cfg: ModelConfig, run, runner=None) -> None:
        super().__init__()
        self.cfg, self._run, self.runner = cfg, run, runner

    @property
    def has_past(self) -> bool:
        return bool(getattr(self.runner, "has_past", False))

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        if cache is not None:
            return self._generation_step(input_ids.cpu(), cache)
        return self._run(input_ids.cpu())

    def _generation_step(self, ids: torch.Tensor, cache) -> torch.Tensor:
        start, new = cache.length, ids.size(1)
        valid = cache.valid[:, : start + new].cpu()
        if self.has_past:
            logits, cache.runtime_past = self.runner.run(
                ids.numpy(), valid.long().numpy(), getattr(cache, "runtime_past", None)
            )
            return torch.from_numpy(logits)
        rows = getattr(cache, "runtime_rows", None) or [[] for _ in range(ids.size(0))]
        out = torch.zeros(ids.size(0), new, self.cfg.vocab_size)
        for i, row in enumerate(rows):
            row += ids[i][valid[i, start:]].tolist()
            if row:
                out[i, -1] = self._run(torch.tensor([row[-self.cfg.max_seq_length :]]))[0, -1].float()
        cache.runtime_rows = rows
        return out


@dataclass
class LoadedModel:
    kind: str
    module: nn.Module
    tokenizer: Tokenizer
    cfg: ModelConfig
    path: Path
    step: int | None = None
    chat_template: ChatTemplate | None = None  # None: a plain language model, or a format without one

    @property
    def prefers_bf16(self) -> bool:
        """A torch model on a device that computes in bf16 (CUDA with bf16 support); a foreign runtime
        (ONNX, TorchScript) counts as the CPU."""
        from llm_training.model.transformer import device_of
        from llm_training.train.device import pick_precision

        return pick_precision("auto", device_of(self.module)) == "bf16"


def load_for_generation(path: str | Path, device: str = "auto", kind: str | None = None) -> LoadedModel:
    """``load_model`` on ``device`` ("auto": CUDA when present), with the weights cast to bf16 where the
    device computes in bf16: autocast would cast every weight again at every generated token."""
    from llm_training.train.device import pick_device

    loaded = load_model(path, pick_device(device), kind)
    if loaded.prefers_bf16:
        loaded.module.to(torch.bfloat16)
    return loaded


FORMATS = ("auto", "checkpoint", "torchscript", "onnx", "safetensors", "hf", "gguf")
TORCHSCRIPT_SUFFIXES = (".torchscript.pt", ".torchscript", ".ts")


def detect_format(path: str | Path) -> str:
    """Which format (checkpoint, onnx, torchscript, safetensors, hf, gguf) the file or folder at ``path``
    is: by its name; a file with another name by its header, for the formats that hold no code."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path} (nor an exported model)")
    if path.is_dir():
        config = path / "config.json"
        if config.is_file() and "model_type" in read_json_object(config):
            return "hf"
        if (path / "model.safetensors").is_file():
            return "safetensors"
        raise UserError(f"{path}: a folder that is neither a Hugging Face model nor a safetensors export")
    name = path.name.lower()
    if name.endswith(TORCHSCRIPT_SUFFIXES):
        return "torchscript"
    by_suffix = {".pt": "checkpoint", ".pth": "checkpoint", ".onnx": "onnx", ".gguf": "gguf",
                 ".safetensors": "safetensors"}  # fmt: skip
    if path.suffix.lower() in by_suffix:
        return by_suffix[path.suffix.lower()]
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == b"GGUF":
        return "gguf"
    if _safetensors_header(head, path):
        return "safetensors"
    # an ONNX ModelProto is serialised field by field, ir_version (field 1, varint: tag 0x08) first
    if head[:1] == b"\x08":
        return "onnx"
    return "checkpoint"  # its loader says what is wrong with it (truncated, TorchScript, not a checkpoint...)


def _safetensors_header(head: bytes, path: Path) -> bool:
    """safetensors starts with the length of its JSON header (8 bytes, little-endian), then ``{``: whatever
    the file is called (``head``: the file's first 9 bytes)."""
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= path.stat().st_size - 8 and head[8:9] == b"{"


def _need_tokenizer(tokenizer: Tokenizer | None, path: Path) -> Tokenizer:
    if tokenizer is None:
        raise UserError(f"{path}: holds no tokenizer; export it again with this tool")
    return tokenizer


def load_model(path: str | Path, device: str | torch.device = "cpu", kind: str | None = None) -> LoadedModel:
    """The model at ``path`` in eval mode; torch formats on ``device``; ONNX on onnxruntime's CPU provider for a
    CPU device, else on its best provider.
    ``kind``: the format, when the caller knows it (``--format``, the exporter's self-check); None or "auto":
    ``detect_format``."""
    path = Path(path)
    if kind not in (None, "auto") and not path.exists():
        raise UserError(f"checkpoint not found: {path} (nor an exported model)")
    kind = detect_format(path) if kind in (None, "auto") else kind
    if kind not in FORMATS:
        raise UserError(f"unknown model format {kind!r}; one of {', '.join(FORMATS)}")
    if kind == "checkpoint":
        from llm_training.train.artifacts import load_trained

        trained = load_trained(path, device)
        template = _template(trained.chat_template, trained.tokenizer, path)
        return LoadedModel(kind, trained.model, trained.tokenizer, trained.config.model, path, trained.step,
                           template)  # fmt: skip
    if kind == "onnx":
        from llm_training.export.onnx import META_CONFIG, META_TOKENIZER, OnnxRunner

        try:
            runner = OnnxRunner(
                path, ["CPUExecutionProvider"] if torch.device(device).type == "cpu" else None
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf on damaged files
            raise UserError(
                f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})"
            ) from None
        if META_CONFIG not in runner.metadata:
            raise UserError(f"{path}: an ONNX model without llm_training's metadata (config and tokenizer)")
        tokenizer = Tokenizer.from_json(runner.metadata[META_TOKENIZER])
        module = RuntimeModule(runner.cfg, runner.logits, runner).eval()
        return LoadedModel(kind, module, tokenizer, runner.cfg, path)
    if kind == "torchscript":
        from llm_training.export.torchscript import load_torchscript

        try:
            module, extra = load_torchscript(path)
        except Exception as exc:  # torch.jit.load raises RuntimeError (and others) on what it cannot read
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{path}: not a readable TorchScript archive ({first[:200]})") from None
        if "config.json" not in extra:
            raise UserError(f"{path}: TorchScript without llm_training's config.json inside")
        cfg = model_config_from_json(extra["config.json"], str(path))
        tokenizer = Tokenizer.from_json(extra["tokenizer.json"]) if "tokenizer.json" in extra else None

        def run(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(ids)

        wrapped = RuntimeModule(cfg, run).eval()
        return LoadedModel(kind, wrapped, _need_tokenizer(tokenizer, path), cfg, path)
    template = None
    if kind == "safetensors":
        from llm_training.export.weights import load_weights

        model, tokenizer = load_weights(path / "model.safetensors" if path.is_dir() else path)
    elif kind == "hf":
        from llm_training.data.chat_reply import folder_template
        from llm_training.export.hf import load_hf

        model, tokenizer = load_hf(path)
        try:
            template = folder_template(path)
        except UserError as exc:  # plain prompts still work; chat requests are told there is no template
            log.warning("%s: its chat template is not used (%s)", path, exc)
    else:
        from llm_training.export.gguf import load_gguf, read_chat_template

        model, tokenizer = load_gguf(path)
        template = _template(read_chat_template(path), tokenizer, path)
    tokenizer = _need_tokenizer(tokenizer, path)
    return LoadedModel(kind, model.to(device).eval(), tokenizer, model.cfg, path, None, template)


def _template(source: str | None, tokenizer: Tokenizer | None, path: Path) -> ChatTemplate | None:
    """A template recorded as text (a checkpoint's config, a GGUF key), with the tokenizer's special tokens."""
    if not source or tokenizer is None:
        return None
    from llm_training.data.chat_reply import template_for

    return template_for(source, tokenizer, str(path))
