"""QLoRA: LoRA adapters (through peft) on linear layers whose frozen weights are 4-bit NF4 with double
quantization, through bitsandbytes' ``Linear4bit`` (the layer peft itself wraps, as ``lora.bnb.Linear4bit``).

Checkpoints stay plain. A 4-bit layer's state is its weight dequantized to float under the name plain LoRA
uses (``<layer>.base_layer.weight``), so every reader folds the adapters in with ``merged_state`` unchanged and
sees the weights the adapters were trained against. Loading a state (``--resume``, a rollback) keeps the layer's
4-bit codes when they already give exactly those weights (a resume of the same model: an exact continuation),
and quantizes the float weight again otherwise; NF4 of a dequantized NF4 weight gives back its codes.

The order of a resumed run: the pretrained model is built, its target layers quantized on the training device,
the adapters injected; then the checkpoint's base weights (checked or quantized again), adapters and optimizer
state are loaded by the usual resume, which needs no branch of its own.
"""

from __future__ import annotations

import functools
import logging

import torch

from llm_training.config import Config
from llm_training.errors import UserError

QLORA_RANK = 16  # the adapters' rank when --qlora comes without --lora-rank
BLOCKSIZE = 64  # weights per absmax scale (bitsandbytes' default for NF4)


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """What the 4-bit layers dequantize to for their matrix product: the run's autocast type on a GPU (bf16
    by default), fp32 on a CPU (bf16 products are slow on most CPUs)."""
    if device.type == "cpu":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def import_bitsandbytes():
    """bitsandbytes, imported without its warning, on CPUs with AVX-512 BF16, about an optional inference
    kernel from the Hugging Face Hub (a download this tool never makes; training does not use it)."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        quiet.setLevel(level)
    return bitsandbytes


@functools.cache
def nf4_linear_class() -> type:
    """``NF4Linear``: bitsandbytes' ``Linear4bit`` whose state dict is its weight in float (built on first use:
    bitsandbytes is an optional dependency)."""
    bnb = import_bitsandbytes()

    class NF4Linear(bnb.nn.Linear4bit):
        """A frozen NF4 linear layer whose ``state_dict()`` holds ``weight`` dequantized and ``bias`` in the
        float type it was quantized from, and whose ``load_state_dict()`` takes such a state back."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # bitsandbytes' own forward casts the bias to the compute type in place, so that checkpoints
            # would hold it rounded to bf16: here it is cast for the sum only
            out = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight, quant_state=self.weight.quant_state)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out.to(x.dtype)

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            destination[prefix + "weight"] = dequantized(self).to(self.float_dtype)
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias.detach().to(self.float_dtype)

        def _load_from_state_dict(self, state, prefix, metadata, strict, missing, unexpected, errors):
            weight, bias = state.get(prefix + "weight"), state.get(prefix + "bias")
            shape = tuple(self.weight.quant_state.shape)
            if weight is None:
                missing.append(prefix + "weight")
            elif tuple(weight.shape) != shape:
                errors.append(f"size mismatch for {prefix}weight: {tuple(weight.shape)} in the checkpoint, "
                              f"{shape} in this model")  # fmt: skip
            elif not torch.equal(dequantized(self).to(self.float_dtype), weight.to(self.weight.device)):
                requantize(self, weight)
            if self.bias is not None:
                if bias is None:
                    missing.append(prefix + "bias")
                else:
                    with torch.no_grad():
                        self.bias.copy_(bias)
            if strict:
                known = {prefix + "weight", prefix + "bias"}
                unexpected.extend(k for k in state if k.startswith(prefix) and k not in known)

    return NF4Linear


def dequantized(layer) -> torch.Tensor:
    """The float weight a 4-bit layer computes with."""
    bnb = import_bitsandbytes()

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def requantize(layer, weight: torch.Tensor) -> None:
    """``weight`` quantized into ``layer``'s 4-bit parameter, on its device, in place."""
    bnb = import_bitsandbytes()

    w = weight.detach().to(device=layer.weight.device, dtype=layer.float_dtype).contiguous()
    packed, state = bnb.functional.quantize_4bit(
        w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
    )
    layer.weight.data, layer.weight.quant_state, layer.quant_state = packed, state, state


def to_nf4(linear: torch.nn.Linear, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen NF4 copy of ``linear`` on ``device`` (double quantization: the absmax scales in 8 bits too)
    computing in ``dtype``; its float weight goes to the device one layer at a time."""
    bnb = import_bitsandbytes()

    cls = nf4_linear_class()
    bias = linear.bias is not None
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        layer = cls(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                    compress_statistics=True, quant_type="nf4")  # fmt: skip
    layer.float_dtype = linear.weight.dtype
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=True,
        quant_type="nf4", module=layer,
    ).to(device)  # fmt: skip
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    return layer


def quantize_linears(
    model: torch.nn.Module, names: set[str], device: torch.device, dtype: torch.dtype
) -> int:
    """Every ``torch.nn.Linear`` of ``model`` whose own name is in ``names`` replaced by its NF4 copy; returns
    how many."""
    chosen = [(name, module) for name, module in model.named_modules()
              if type(module) is torch.nn.Linear and name.rpartition(".")[2] in names]  # fmt: skip
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, to_nf4(module, device, dtype))
    return len(chosen)


def check_4bit(device: torch.device, dtype: torch.dtype) -> None:
    """A one-line UserError unless bitsandbytes runs a 4-bit layer's forward and backward on ``device``."""
    bnb = import_bitsandbytes()

    rng = torch.random.get_rng_state()  # the probe's initialisation must not move the run's random stream
    try:
        layer = to_nf4(torch.nn.Linear(128, 64), device, dtype)
        x = torch.ones(2, 128, device=device, requires_grad=True)
        layer(x).float().sum().backward()
        ok = x.grad is not None and bool(torch.isfinite(x.grad).all())
        why = "its backward pass gave no finite gradient"
    except Exception as exc:  # a backend without 4-bit kernels raises anything from NotImplementedError on
        ok, why = False, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
    finally:
        torch.random.set_rng_state(rng)
    if not ok:
        raise UserError(f"finetune.qlora: bitsandbytes {bnb.__version__} cannot run 4-bit layers on {device} "
                        f"({why}); train on a CUDA GPU, or use --lora-rank without --qlora")  # fmt: skip


def add_qlora(model: torch.nn.Module, cfg: Config, train_embeddings: bool = False) -> str:
    """Quantize ``cfg.finetune.lora_targets``'s block layers of ``model`` to NF4 on the run's device and add
    LoRA adapters (rank ``finetune.lora_rank``, else ``QLORA_RANK``, recorded in ``cfg``) through peft;
    returns the line for the run's summary. Embeddings, norms and the head keep their weights."""
    import_bitsandbytes()  # absent: the commands' one-line error names the 'finetune' extra
    from llm_training.train.device import resolve_runtime
    from llm_training.train.lora import TARGETS, add_lora, target_names

    f = cfg.finetune
    f.lora_rank = f.lora_rank or QLORA_RANK
    runtime = resolve_runtime(cfg)
    dtype = compute_dtype(runtime.device, runtime.precision)
    check_4bit(runtime.device, dtype)
    before = model.num_parameters()
    names = set(target_names(f.lora_targets, model.cfg.tie_embeddings)) & set(TARGETS)  # checked first
    layers = quantize_linears(model, names, runtime.device, dtype)
    model.is_loaded_in_4bit = True  # what peft reads to wrap bitsandbytes' 4-bit layers
    try:
        trainable = add_lora(
            model, f.lora_rank, f.lora_alpha, f.lora_dropout, f.lora_targets, train_embeddings
        )
    finally:
        del model.is_loaded_in_4bit
    return (f"QLoRA rank {f.lora_rank} on {f.lora_targets}: {layers} linear layers in 4-bit NF4 on "
            f"{runtime.device} (computing in {str(dtype).removeprefix('torch.')}), {trainable:,} of {before:,} "
            "parameters trained; checkpoints hold the base weights dequantized, and every reader merges "
            "the adapters")  # fmt: skip
