"""ONNX export through ``torch.onnx.export`` (the ``torch.export`` path), int8 and fp16 through onnxruntime's
own tools, and a runner for the exported file.

Two graphs:
- logits: ``input_ids`` (batch, sequence) -> ``logits`` (batch, sequence, vocabulary);
- with past (``past=True``): ``input_ids`` (batch, new), ``attention_mask`` (batch, past + new, 1 for real
  tokens, 0 for left padding) and ``past_key_values.{i}.key|value`` (batch, kv heads, past, head size) ->
  ``logits`` and ``present.{i}.key|value`` (past + new). A first call passes a past of length 0, so one file
  serves the prompt and every generated token, the way Hugging Face's ``*-with-past`` exports do.

The model config and the tokenizer travel inside the file as metadata (``llm_training.config``,
``llm_training.tokenizer``), so ``llm-infer --model model.onnx`` and the server need nothing beside it.
Weights over 1.8 GB go to a ``.data`` file beside the model (protobuf's 2 GB limit).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llm_training.config import ModelConfig, model_config_from_json
from llm_training.export.quiet import quiet
from llm_training.model.transformer import Transformer, cache_mask, head_size

META_CONFIG, META_TOKENIZER, META_PAST = "llm_training.config", "llm_training.tokenizer", "llm_training.past"
EXTERNAL_DATA_BYTES = 1_800_000_000


class _PastLayer:
    """One layer's past keys and values; ``append`` returns past + new (what attention reads)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> None:
        self.k, self.v, self.mask = k, v, mask
        self.present: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.present = (torch.cat([self.k.to(k.dtype), k], dim=2), torch.cat([self.v.to(v.dtype), v], dim=2))
        return self.present


class _PastCache:
    """The cache protocol of ``Transformer.forward`` (``positions``, ``layers[i].append``, ``mask``) over
    explicit tensors, as ``KVCache`` builds it: each row's own positions, causal, padding hidden, and each
    position seeing itself so that no softmax row is empty."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor, new: int):
        total = attention_mask.size(1)
        start = total - new
        valid = attention_mask.bool()
        self.positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, start:]
        self.mask = cache_mask(valid, torch.arange(new, device=valid.device) + start, total)
        self.layers = [_PastLayer(k, v, self.mask) for k, v in past]


class WithPast(nn.Module):
    """``(input_ids, attention_mask, *past)`` -> ``(logits, *present)``, flat, for export."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        cache = _PastCache(list(zip(past[0::2], past[1::2], strict=True)), attention_mask, input_ids.size(1))
        logits = self.model(input_ids, cache=cache)
        return (logits, *(t for layer in cache.layers for t in layer.present))


def kv_shape(cfg: ModelConfig, batch: int, length: int) -> tuple[int, int, int, int]:
    return (
        batch,
        cfg.num_kv_heads or cfg.num_attention_heads,
        length,
        head_size(cfg),
    )


def past_names(layers: int) -> tuple[list[str], list[str]]:
    inputs = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return inputs, [name.replace("past_key_values", "present") for name in inputs]


def export_onnx(model: Transformer, path: Path, metadata: dict[str, str], past: bool = False) -> None:
    """Write ``model`` (fp32, eval) to ``path`` with dynamic batch and sequence axes."""
    import onnx

    model = model.float().eval()
    cfg = model.cfg
    sample_len = min(8, cfg.max_seq_length)
    ids = torch.randint(0, cfg.vocab_size, (2, sample_len))
    auto = torch.export.Dim.AUTO
    if past:
        inputs, outputs = past_names(cfg.num_layers)
        kv = [torch.zeros(kv_shape(cfg, 2, 3)) for _ in inputs]
        args = (ids, torch.ones(2, 3 + sample_len, dtype=torch.long), *kv)
        module: nn.Module = WithPast(model).eval()
        names, out_names = ["input_ids", "attention_mask", *inputs], ["logits", *outputs]
        shapes = {"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
                  "past": tuple({0: auto, 2: auto} for _ in kv)}  # fmt: skip
    else:
        args, module = (ids,), model
        names, out_names = ["input_ids"], ["logits"]
        shapes = {"input_ids": {0: auto, 1: auto}}
    big = sum(p.numel() * 4 for p in model.parameters()) > EXTERNAL_DATA_BYTES
    with quiet(), torch.no_grad():
        program = torch.onnx.export(module, args, input_names=names, output_names=out_names,
                                    dynamic_shapes=shapes, dynamo=True, verbose=False)  # fmt: skip
    proto = program.model_proto
    _set_metadata(proto, {**metadata, META_PAST: "1" if past else "0"})
    _save(proto, path, big)
    onnx.checker.check_model(str(path))


def _set_metadata(proto, metadata: dict[str, str]) -> None:
    import onnx

    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def _save(proto, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)  # fmt: skip
    else:
        onnx.save_model(proto, str(path))


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization (weights int8 ahead of time, activations at run time) of every MatMul and
    Gather, with onnxruntime's quantizer (which keeps the model's metadata)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"],
                         use_external_data_format=_external(source))  # fmt: skip
    onnx.checker.check_model(str(target))  # the quantizer keeps the metadata


def convert_fp16(source: Path, target: Path) -> None:
    """Weights and compute in fp16 with fp32 inputs and outputs (onnxruntime's converter inserts the casts;
    norms and softmax stay where it keeps them in fp32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = onnx.load(str(source))
    with quiet():
        half = convert_float_to_float16(proto, keep_io_types=True)
        # the converter appends its casts of the past inputs after the nodes that read them: the checker
        # (and some runtimes) need the nodes in topological order
        OnnxModel(half).topological_sort()
    _save(half, target, _external(source))
    onnx.checker.check_model(str(target))


def _external(path: Path) -> bool:
    return (path.parent / (path.name + ".data")).exists()


class OnnxRunner:
    """An exported ONNX model run by onnxruntime: ``logits(ids)`` for whole sequences, and ``run`` with past
    keys and values (generation) when the file has them. ``cfg``: the model config it carries (None for an
    ONNX file that another tool wrote)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        chosen = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), options, providers=chosen)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.cfg = model_config_from_json(meta[META_CONFIG], str(path)) if META_CONFIG in meta else None
        self.has_past = meta.get(META_PAST) == "1"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int):
        import numpy as np

        shape = kv_shape(self.cfg, batch, 0)
        return [np.zeros(shape, dtype=np.float32) for _ in self.input_names[2:]]

    def run(self, input_ids, attention_mask=None, past=None):
        """Logits (numpy, fp32), and the present keys and values when the file has past inputs."""
        import numpy as np

        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if not self.has_past:
            return self.session.run(["logits"], {"input_ids": ids})[0], None
        past = past if past is not None else self.empty_past(ids.shape[0])
        if attention_mask is None:
            attention_mask = np.ones((ids.shape[0], past[0].shape[2] + ids.shape[1]), dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        feed.update(zip(self.input_names[2:], past, strict=True))
        outputs = self.session.run(self.output_names, feed)
        return outputs[0], outputs[1:]

    def logits(self, input_ids) -> torch.Tensor:
        return torch.from_numpy(self.run(input_ids)[0])
