"""Peak memory of importing a sharded Hugging Face folder: ``load_hf`` (shards read one tensor at a time into a
model built on the meta device) against the way it was done before (every shard loaded into one dict of
tensors, then a randomly initialised model, then a copy). Each way runs in a fresh process; peak is the
process's VmHWM (resident high-water mark) minus its resident size just before the import.

    python bench/hf_import_memory.py [--layers 12] [--width 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def status(key: str) -> float:
    """A /proc/self/status figure in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def measure(way: str, folder: str) -> dict:
    """Runs in the child: import ``folder`` ``way``, report memory."""
    import torch
    from safetensors.torch import load_file

    from llm_training.export import hf_import
    from llm_training.export.hf import load_hf, load_state
    from llm_training.model.transformer import Transformer

    torch.set_grad_enabled(False)
    before = status("VmRSS")
    if way == "load_hf":
        model, _ = load_hf(folder)
    else:  # before: every tensor in one dict, a random model, a copy
        path = Path(folder)
        config = hf_import.read_json_object(path / "config.json")
        c = {**hf_import.FAMILIES["llama"], **config}
        cfg = hf_import._llama_config("llama", c, hf_import.Shards.of(path), folder)
        hf: dict = {}
        for file in sorted(path.glob("*.safetensors")):
            hf.update(load_file(str(file)))
        model = Transformer(cfg)
        load_state(model, hf, folder)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"way": way, "model_mb": round(weights), "peak_increase_mb": round(status("VmHWM") - before),
            "final_increase_mb": round(status("VmRSS") - before),
            "rss_anon_mb": round(status("RssAnon")), "rss_file_mb": round(status("RssFile"))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.LlamaConfig(hidden_size=args.width, num_hidden_layers=args.layers,
                                          num_attention_heads=args.width // 64, num_key_value_heads=args.width // 256,
                                          intermediate_size=args.width * 11 // 4, vocab_size=32000,
                                          max_position_embeddings=2048)  # fmt: skip
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        model.to_empty(device="cpu")
        model.save_pretrained(tmp, max_shard_size="200MB")
        shards = len(list(Path(tmp).glob("*.safetensors")))
        del model
        print(f"# llama {args.layers} x {args.width}, fp32, {shards} shards; torch {torch.__version__}")
        for way in ("load_hf", "before"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", way, tmp], capture_output=True, text=True
            )
            print(out.stdout.strip() or out.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
