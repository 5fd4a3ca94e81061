"""Model families imported from folders ``transformers`` itself wrote (random tiny models, ``save_pretrained``),
each beside GPT-2's real tokenizer as a Hugging Face tokenizer folder: ``load_hf`` gives transformers' logits
on a real sentence (fp32; each test prints the largest difference), sharded weights load through their index,
the folder's tokenizer keeps its own vocabulary and special tokens (50,257 tokens for 50,257 rows), and what
our model cannot compute is refused in one line naming the key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import REPO, call_cli, corpus_records
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import DataError, UserError
from llm_training.export.hf import load_hf

transformers = pytest.importorskip("transformers")

GPT2_FILES = REPO.parent / "shared" / "tokenizers" / "gpt2"
VOCAB = 50257  # GPT-2's tokenizer: the models' rows are its ids, no more
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "vocab_size": VOCAB, "max_position_embeddings": 64}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """GPT-2's tokenizer as a Hugging Face folder: tokenizer.json and tokenizer_config.json (eos and bos
    <|endoftext|>, no pad), as transformers writes them."""
    if not GPT2_FILES.is_dir():
        pytest.skip(f"{GPT2_FILES} not present")
    vocab = json.loads((GPT2_FILES / "encoder.json").read_text())
    lines = (GPT2_FILES / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    transformers.GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_tokenizer(tokenizer_folder):
    return Tokenizer.load(tokenizer_folder)


@pytest.fixture(scope="module")
def ids(gpt2_tokenizer):
    """A real sentence's ids: the first 60 tokens of a play."""
    text = corpus_records("shakespeare", 1)[0]["text"][:2000]
    return torch.tensor([gpt2_tokenizer.encode(text)[:60]])


def saved(model, folder, tokenizer_folder, **save):
    """``model`` with trained-looking weights (norms and biases away from 1 and 0), saved by transformers
    with the tokenizer folder's files beside it."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(folder, **save)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    return folder


def assert_same_logits(name, folder, theirs, ids):
    ours, tokenizer = load_hf(folder)
    with torch.no_grad():
        diff = (ours.eval()(ids) - theirs(ids).logits).abs().max().item()
    print(f"{name}: max abs logit difference {diff:.2e}")
    assert diff < 1e-4, (name, diff)
    assert tokenizer.vocab_size == ours.cfg.vocab_size == VOCAB
    return ours


def model_of(family: str, **extra):
    classes = {
        "llama": "Llama",
        "mistral": "Mistral",
        "ministral": "Ministral",
        "qwen2": "Qwen2",
        "qwen3": "Qwen3",
    }
    config = getattr(transformers, f"{classes[family]}Config")(**{**SMALL, **extra})
    return getattr(transformers, f"{classes[family]}ForCausalLM")(config)


LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # wavelengths on all 3 sides  # fmt: skip
CASES = {
    "llama": ("llama", {}),
    "llama 3.1 rope (llama3)": ("llama", {"rope_parameters": LLAMA3, "tie_word_embeddings": True}),
    "llama rope linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "llama rope dynamic": ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}),
    "mistral (sliding_window null, head_dim 32)": ("mistral", {"sliding_window": None, "head_dim": 32}),
    "ministral (a window longer than the context)": ("ministral", {"sliding_window": 4096, "head_dim": 32}),
    "qwen2 (q/k/v biases, tied)": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3 (qk-norm, head_dim 32)": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    "qwen3 with attention_bias": ("qwen3", {"head_dim": 32, "attention_bias": True}),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_families_give_transformers_logits(tmp_path, tokenizer_folder, ids, name):
    family, extra = CASES[name]
    theirs = model_of(family, **extra)
    ours = assert_same_logits(name, saved(theirs, tmp_path / "m", tokenizer_folder), theirs, ids)
    assert ours.cfg.tie_embeddings == extra.get("tie_word_embeddings", False)
    assert ours.cfg.qk_norm == (family == "qwen3") and ours.cfg.max_seq_length == 64
    if family == "qwen2":
        assert (ours.cfg.bias, ours.cfg.qkv_bias) == (False, True)
        assert ours.blocks[0].attn.proj.bias is None and ours.blocks[0].mlp.up.bias is None
    if "head_dim" in extra:
        assert ours.cfg.head_dim == 32 and ours.blocks[0].attn.qkv.out_features == (4 + 2 * 2) * 32


def test_gpt2(tmp_path, tokenizer_folder, ids):
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    theirs = transformers.GPT2LMHeadModel(config)
    ours = assert_same_logits("gpt2", saved(theirs, tmp_path / "m", tokenizer_folder), theirs, ids)
    assert ours.cfg.tie_embeddings and ours.lm_head.weight is ours.embed.weight


SLIDING = {
    "mistral": {"sliding_window": 16},
    "ministral": {
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "head_dim": 16,
    },
    "qwen2": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
}


@pytest.mark.parametrize("family", SLIDING)
def test_a_sliding_window_shorter_than_the_context_becomes_the_context(
    tmp_path, tokenizer_folder, ids, family
):
    """Within its window, sliding-window attention is causal attention: imported with the window as its
    context, the model gives transformers' logits for every sequence it accepts."""
    theirs = model_of(family, **SLIDING[family])
    folder = saved(theirs, tmp_path / "m", tokenizer_folder)
    ours = assert_same_logits(f"{family} (sliding_window 16)", folder, theirs, ids[:, :16])
    assert ours.cfg.max_seq_length == 16
    with pytest.raises(ValueError, match="longer than the context"):
        ours(ids)


def test_sharded_weights_load_through_their_index(tmp_path, tokenizer_folder, ids):
    """``save_pretrained(max_shard_size=...)``: shards and model.safetensors.index.json; the index says
    which files hold weights (a stray consolidated.safetensors, as Mistral's folders have, is not read)."""
    theirs = model_of("qwen2")
    folder = saved(theirs, tmp_path / "m", tokenizer_folder, max_shard_size="4MB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (folder / "model.safetensors.index.json").is_file()
    (folder / "consolidated.safetensors").write_bytes(b"not safetensors")
    assert_same_logits("qwen2 in shards", folder, theirs, ids)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="not a file in"):
        load_hf(folder)


def test_an_imported_qwen2_exports_back_with_its_own_tokenizer(tmp_path, tokenizer_folder, ids):
    """Import, then ``save_hf``: transformers loads a Qwen2ForCausalLM with the same logits, and the
    tokenizer keeps GPT-2's special tokens (no <|pad|> or <|bos|> appear)."""
    from llm_training.export.hf import save_hf

    theirs = model_of("qwen2", tie_word_embeddings=True)
    ours, tok = load_hf(saved(theirs, tmp_path / "m", tokenizer_folder))
    out = save_hf(ours.eval(), tok, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert type(again).__name__ == "Qwen2ForCausalLM" and torch.allclose(
            again(ids).logits, theirs(ids).logits
        )
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (len(hf_tok), hf_tok.eos_token, hf_tok.pad_token) == (VOCAB, "<|endoftext|>", None)
    assert Tokenizer.load(out).special == tok.special


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer_folder):
    return saved(model_of("llama"), tmp_path_factory.mktemp("llama"), tokenizer_folder)


REFUSED = [
    ({"model_type": "gemma"}, 'model_type = "gemma"', "gpt2, llama, mistral, ministral, qwen2, qwen3"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
     'rope_parameters.rope_type = "yarn"', "default, linear, dynamic, llama3"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, 'rope_scaling.type = "longrope"', "llama3"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     "rope_parameters.low_freq_factor = null", "positive number"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5", "whole head"),
    ({"hidden_act": "gelu"}, 'hidden_act = "gelu"', "silu"),
    ({"layer_types": ["full_attention", "linear_attention"]}, "layer_types", "full or sliding-window"),
]  # fmt: skip


@pytest.mark.parametrize("change, needle, supported", REFUSED)
def test_what_our_model_cannot_compute_is_refused_in_one_line(
    tmp_path, llama_folder, change, needle, supported
):
    folder = shutil.copytree(llama_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError) as caught:
        load_hf(folder)
    message = str(caught.value)
    assert "config.json" in message and "\n" not in message, message
    assert needle in message and supported in message, message


def test_the_folders_tokenizer_keeps_its_vocabulary_and_special_tokens(
    tmp_path, tokenizer_folder, gpt2_tokenizer
):
    tok = gpt2_tokenizer
    assert (tok.vocab_size, tok.eot_id, tok.bos_id, tok.pad_id) == (VOCAB, 50256, 50256, 50256)
    assert tok.encode("Hello world") == [15496, 995] and tok.uses_tiktoken
    # saved forms (prepared data's vocab.json, checkpoints' JSON) give the same tokenizer back, and Hugging
    # Face still reads them (the roles' key in the token entries is ignored)
    from tokenizers import Tokenizer as HFTokenizer

    tok.save(tmp_path / "vocab.json")
    assert HFTokenizer.from_file(str(tmp_path / "vocab.json")).get_vocab_size() == VOCAB
    for back in (Tokenizer.load(tmp_path / "vocab.json"), Tokenizer.from_json(tok.to_str())):
        assert back.special == tok.special and back.fingerprint == tok.fingerprint
        assert back.vocab_size == VOCAB
    # a model without bos whose pad is a token of its own (Qwen-like): pad need not be eos, bos may be none
    folder = shutil.copytree(tokenizer_folder, tmp_path / "qwen_like")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config |= {"bos_token": None, "pad_token": {"content": "!", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(folder / "tokenizer.json")
    assert (tok.vocab_size, tok.eot_id, tok.bos_id, tok.pad_id) == (VOCAB, 50256, None, 0)
    assert Tokenizer.from_json(tok.to_str()).pad_id == 0
    # an eos the vocabulary lacks would need a row the model has not: refused
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"eos_token": "<|im_end|>"}))
    with pytest.raises(DataError, match="'<\\|im_end\\|>' .* is not in its vocabulary"):
        Tokenizer.load(folder)
    # without tokenizer_config.json it is not a model's folder: our special tokens are added, as before
    (folder / "tokenizer_config.json").unlink()
    assert Tokenizer.load(folder).vocab_size == VOCAB + 2


def test_prepare_data_with_the_folders_tokenizer_then_fine_tune_its_model(tmp_path, tokenizer_folder):
    """llm-prepare-data --tokenizer <folder>, then the folder's own GPT-2 trains on that data: the data has
    50,257 tokens like the model (with <|pad|> and <|bos|> added it had 50,259, and training refused)."""
    import llm_training as lib

    theirs = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=64)
    )
    folder = saved(theirs, tmp_path / "gpt2", tokenizer_folder)
    plays = corpus_records("shakespeare", 2)
    source = tmp_path / "plays.jsonl"
    source.write_text("".join(json.dumps({"text": r["text"][:20_000]}) + "\n" for r in plays))
    from llm_training.cli.prepare_data import main

    args = ["--input", str(source), "--output", str(tmp_path / "data"), "--tokenizer", str(folder),
            "--validation-fraction", "0.5", "--quiet"]  # fmt: skip
    proc = call_cli(main, args)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "data" / "train.json").read_text())
    assert (manifest["vocab_size"], manifest["eot_id"]) == (VOCAB, 50256)
    model = lib.ModelInitializer().initialize(
        lib.ModelInitializerInput(initialization={"method": "pretrained", "path": str(folder)})
    )
    loader = lib.DataLoader().create_loader(
        lib.DataLoaderInput(dataset_path=str(tmp_path / "data" / "train.json"), batch_size=4)
    )
    result = lib.TrainingOrchestrator().train(
        lib.TrainingOrchestratorInput(model_id=model.model_id, training_config={
            "output_dir": str(tmp_path / "run"), "max_steps": 2, "sample_tokens": 0, "eval_batches": 1,
            "eval_at_start": False, "logging.progress_bar": False}),
        data_loader_output=loader,
    )  # fmt: skip
    assert result.steps == 2 and result.val_loss < 20
