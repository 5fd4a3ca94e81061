"""A user of a Hugging Face export, as tests/test_export_hf_clients.py runs it: under another interpreter
(transformers 4.x or 5.x) with ``-I``, knowing nothing of llm_training. Loads the folder with
AutoModelForCausalLM and AutoTokenizer, runs ``model(**tok(text))`` (one text, then two padded together)
and ``model.generate(**tok(text), max_new_tokens=5)``, and prints JSON for the test to compare."""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(folder: str, text: str, short: str) -> dict:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).float().eval()
    one = tok(text, return_tensors="pt")
    both = tok([text, short], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**one).logits[0]
        padded = model(**both).logits
        generated = model.generate(**one, max_new_tokens=5)[0, one["input_ids"].shape[1] :]
    return {
        "version": transformers.__version__,
        "model_class": type(model).__name__,
        "input_names": sorted(one),
        "ids": one["input_ids"][0].tolist(),
        "logits": logits.tolist(),
        "padded_ids": both["input_ids"].tolist(),
        "padded_mask": both["attention_mask"].tolist(),
        "padded_logits": padded.tolist(),
        "generated": generated.tolist(),
        "imported_llm_training": any(name.startswith("llm_training") for name in sys.modules),
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
