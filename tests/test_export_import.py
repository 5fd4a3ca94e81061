"""Importing Hugging Face folders that ``transformers`` itself wrote (``GPT2LMHeadModel`` and
``LlamaForCausalLM`` with random weights, ``save_pretrained``): ``load_hf`` and ``ModelInitializer`` give
transformers' logits in fp32, and a config field that our model cannot compute is refused in one line that
names it, never ignored."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import assert_user_error, corpus_records, run_cli
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import UserError
from llm_training.export.hf import load_hf

transformers = pytest.importorskip("transformers")

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([r["text"][:40_000] for r in corpus_records("shakespeare", 2)], 400)


def saved(model, tokenizer: Tokenizer, folder):
    """``model`` with trained-looking weights (biases and norms away from 0 and 1), saved by transformers
    with our tokenizer beside it."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return folder


def assert_same_logits(folder, theirs, tokenizer):
    ours, ours_tok = load_hf(folder)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        diff = (ours.eval()(ids) - theirs(ids).logits).abs().max()
    assert diff < 2e-5 and ours_tok.encode(TEXT) == ids[0].tolist()
    return ours


def gpt2(**extra):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=448, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, **extra))  # fmt: skip


def llama(**extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 96, "vocab_size": 448, "max_position_embeddings": 64, **extra}  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**config))


GPT2_CASES = [{"activation_function": "gelu_pytorch_tanh"},
              {"tie_word_embeddings": False, "n_inner": 96, "layer_norm_epsilon": 1e-3}]  # fmt: skip


@pytest.mark.parametrize("extra", GPT2_CASES)
def test_gpt2_folders_give_transformers_logits(tmp_path, tokenizer, extra):
    theirs = gpt2(**extra)
    ours = assert_same_logits(saved(theirs, tokenizer, tmp_path / "m"), theirs, tokenizer)
    assert ours.cfg.bias and ours.cfg.tie_embeddings == extra.get("tie_word_embeddings", True)


LLAMA_CASES = [
    {"rope_theta": 500_000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},  # -> rope_parameters
    {"attention_bias": True, "mlp_bias": False},
    {"attention_bias": False, "mlp_bias": True},
]


@pytest.mark.parametrize("extra", LLAMA_CASES)
def test_llama_folders_give_transformers_logits(tmp_path, tokenizer, extra):
    theirs = llama(**extra)
    folder = saved(theirs, tokenizer, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == extra.get(
        "rope_theta", 10000
    )
    ours = assert_same_logits(folder, theirs, tokenizer)
    assert ours.cfg.rope_theta == extra.get("rope_theta", 10000.0) and ours.cfg.num_kv_heads == 2


def test_transformers_4_style_rope_theta_and_model_initializer(tmp_path, tokenizer):
    """``rope_theta`` at the top of config.json (as transformers 4 wrote it), and ``ModelInitializer``
    keeping the folder's tokenizer."""
    from llm_training import ModelInitializer, ModelInitializerInput

    theirs = llama(rope_theta=500_000.0, attention_bias=True)
    folder = saved(theirs, tokenizer, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["rope_scaling"] = None
    (folder / "config.json").write_text(json.dumps(config))
    assert assert_same_logits(folder, theirs, tokenizer).cfg.rope_theta == 500_000.0
    out = ModelInitializer().initialize(
        ModelInitializerInput(initialization={"method": "pretrained", "path": str(folder)})
    )
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        assert (out.model.eval()(ids) - theirs(ids).logits).abs().max() < 2e-5
    assert out.tokenizer.fingerprint == tokenizer.fingerprint
    assert out.tokenizer_path == str(folder / "tokenizer.json")


REFUSED = [
    ("llama", {"hidden_act": "gelu"}, "hidden_act = \"gelu\""),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}},
     "rope_parameters.rope_type = \"yarn\""),
    ("llama", {"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.type = \"longrope\""),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}}, "rope_parameters.factor = null"),
    ("llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ("gpt2", {"activation_function": "gelu"}, "activation_function = \"gelu\""),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx = true"),
    ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights = false"),
]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("import")
    return {
        "llama": saved(llama(), tokenizer, root / "llama"),
        "gpt2": saved(gpt2(), tokenizer, root / "gpt2"),
    }


@pytest.mark.parametrize("kind, change, needle", REFUSED)
def test_fields_our_model_cannot_compute_are_refused(tmp_path, folders, kind, change, needle):
    folder = shutil.copytree(folders[kind], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError) as caught:
        load_hf(folder)
    message = str(caught.value)
    assert needle in message and "config.json" in message and "\n" not in message


def test_a_refused_folder_is_one_line_in_the_cli(tmp_path, folders):
    folder = shutil.copytree(folders["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "To be"}) + "\n")
    proc = run_cli(["-m", "llm_training.cli.infer", "--model", str(folder), "--input", str(prompts),
                    "--output", str(tmp_path / "out.jsonl"), "--device", "cpu"], tmp_path)  # fmt: skip
    assert_user_error(proc, 'rope_parameters.rope_type = "yarn"', "default, linear, dynamic, llama3")
