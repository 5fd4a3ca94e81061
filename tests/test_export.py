"""``llm-export``, ``ModelExporter`` and ``Trainer.export``: every format written from a model trained on
Shakespeare, checked by its own runtime inside the exporter, and checked again here with the real
``onnxruntime``, ``torch.jit``, ``safetensors``, ``transformers`` (including its GGUF reader) and ``gguf``."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from conftest import assert_user_error, call_cli, corpus_records, run_cli, train_on_plays
from llm_training.train.artifacts import load_trained

pytest.importorskip("onnxruntime")
pytest.importorskip("gguf")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) needs it
transformers = pytest.importorskip("transformers")

EXPORT = ["-m", "llm_training.cli.export"]
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small Llama-style model (grouped-query attention) trained for 80 steps on four plays; a fifth play
    is the validation text."""
    checkpoint, text, _ = train_on_plays(tmp_path_factory.mktemp("export"), 80, **{"model.num_kv_heads": 2})
    return checkpoint, text


def reference(checkpoint):
    trained = load_trained(checkpoint)
    ids = torch.tensor([trained.tokenizer.encode(TEXT)])
    with torch.no_grad():
        return trained, ids, trained.model(ids)


def test_every_format_from_one_command_runs_in_its_own_runtime(trained, tmp_path):
    import onnxruntime as ort
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, text = trained
    out = tmp_path / "exports"
    proc = run_cli([*EXPORT, "--checkpoint", str(checkpoint), "--formats", "onnx,torchscript,safetensors,hf,gguf",
                    "--output-dir", str(out), "--quantize", "int8", "--validation-data", str(text),
                    "--json", str(tmp_path / "r.json")], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = {r["format"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert set(results) == {"onnx", "torchscript", "safetensors", "hf", "gguf"}
    for r in results.values():  # sizes reported, every check ran in the format's runtime
        assert r["size_bytes"] > 10_000 and r["source_bytes"] > 0 and r["check"]["tokens_compared"] >= 64
    # int8 where the format has it: smaller, and its perplexity change measured on the play
    for fmt in ("onnx", "gguf"):
        c = results[fmt]["check"]
        # smaller than the fp32 weights even with the tokenizer and graph inside (a 0.13M model)
        assert (
            results[fmt]["quantize"] == "int8" and results[fmt]["size_bytes"] < results[fmt]["source_bytes"]
        )
        assert c["validation_text"] == str(text) and c["validation_tokens"] > 1000
        assert abs(c["perplexity_change"]) < 0.05 and c["perplexity_before"] > 1
    for fmt in ("torchscript", "safetensors", "hf"):  # no int8 there: written in fp32, same logits
        assert results[fmt]["quantize"] == "none" and results[fmt]["check"]["max_logit_diff"] < 1e-4
    assert "perplexity" in proc.stdout and "onnx int8" in proc.stdout
    # every file of every format readable as cp would make it (safetensors writes 0600 temporary files)
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [out, *out.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~mask, path

    trained_model, ids, logits = reference(checkpoint)
    # ONNX: onnxruntime on a batch and length other than the exported sample's; int8 stays close
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.concatenate([ids.numpy()] * 3)
    feed = {"input_ids": batch, "attention_mask": np.ones_like(batch)}  # with past (the default): empty past
    feed.update({i.name: np.zeros((3, 2, 0, 16), np.float32) for i in session.get_inputs()[2:]})
    got, *present = session.run(None, feed)
    assert got.shape == (3, ids.shape[1], 512) and present[0].shape == (3, 2, ids.shape[1], 16)
    assert (got.argmax(-1)[0] == logits.argmax(-1)[0].numpy()).mean() > 0.8
    # TorchScript without this package's code: torch.jit.load, any sequence length
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    assert torch.allclose(scripted(ids), logits, atol=1e-5)
    assert torch.allclose(scripted(ids[:, :3]), logits[:, :3], atol=1e-5)
    # safetensors with its config and tokenizer beside it
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights["embed.weight"], trained_model.model.embed.weight)
    assert json.loads((out / "config.json").read_text())["num_kv_heads"] == 2
    assert (out / "tokenizer.json").is_file()
    # Hugging Face: AutoModelForCausalLM and AutoTokenizer as they are
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    assert AutoTokenizer.from_pretrained(out / "hf").encode(TEXT) == ids[0].tolist()
    with torch.no_grad():
        assert (hf(ids).logits - logits).abs().max() < 1e-4
    # GGUF: transformers' own GGUF reader (llama.cpp's tensor names, Q/K layout and tokenizer) agrees
    gguf_model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    gguf_tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert gguf_tok(TEXT)["input_ids"] == ids[0].tolist()
    with torch.no_grad():  # q8_0: 8-bit blocks; the logits stay close
        assert (gguf_model(ids).logits - logits).abs().max() < 0.2


def test_gguf_metadata_is_what_llama_cpp_reads(trained, tmp_path):
    import gguf

    from llm_training.export.exporter import ExportOptions, export_checkpoint

    checkpoint, _ = trained
    result = export_checkpoint(checkpoint, ExportOptions(format="gguf", output=tmp_path / "m.gguf"))
    reader = gguf.GGUFReader(str(result.export_path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.context_length"] == 64 and fields["llama.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 512
    names = {t.name for t in reader.tensors}
    assert {
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.1.ffn_gate.weight",
        "output_norm.weight",
    } <= names
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)


def test_gpt2_style_gguf_and_onnx_fp16(tmp_path, caplog):
    """GPT-2 style: GGUF read by transformers' GGUF loader and ONNX in fp16. The file's gpt2.context_length
    is the position table's size, as llama.cpp reads it; transformers' loader maps that key to n_ctx, which
    GPT2Config does not read, and builds GPT-2's 1024 positions unless n_positions is given (README); its
    feed_forward_length likewise does not reach n_inner. The export logs both arguments."""
    import gguf
    from transformers import AutoModelForCausalLM

    from llm_training.config import ModelConfig
    from llm_training.data.tokenizer import Tokenizer
    from llm_training.export.gguf import load_gguf, save_gguf
    from llm_training.export.onnx import OnnxRunner, convert_fp16, export_onnx
    from llm_training.model.transformer import Transformer

    tokenizer = Tokenizer.train([r["text"][:40_000] for r in corpus_records("shakespeare", 2)], 400)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="gpt2", num_layers=2, hidden_size=64, num_attention_heads=4,
                      vocab_size=tokenizer.vocab_size, max_seq_length=64, intermediate_size=512, bias=True)  # fmt: skip
    model = Transformer(cfg).eval()
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        logits = model(ids)
        with caplog.at_level("INFO", "llm_training.export"):
            save_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
        assert "gguf_file=..., n_positions=64, n_inner=512)" in caplog.text
        reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
        assert reader.fields["gpt2.context_length"].contents() == 64
        assert reader.fields["gpt2.feed_forward_length"].contents() == 512
        theirs = AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file="m.gguf", dtype=torch.float32, n_positions=64, n_inner=512
        ).eval()
        assert type(theirs).__name__ == "GPT2LMHeadModel"
        assert (theirs(ids).logits - logits).abs().max() < 1e-4
        back, back_tok = load_gguf(tmp_path / "m.gguf")
        assert (
            torch.allclose(back.eval()(ids), logits, atol=1e-5) and back_tok.encode(TEXT) == ids[0].tolist()
        )
    export_onnx(model, tmp_path / "m32.onnx", {})
    convert_fp16(tmp_path / "m32.onnx", tmp_path / "m16.onnx")
    got = OnnxRunner(tmp_path / "m16.onnx", ["CPUExecutionProvider"]).logits(ids.numpy())
    assert (got - logits).abs().max() < 0.05 and (tmp_path / "m16.onnx").stat().st_size < 0.6 * (
        tmp_path / "m32.onnx"
    ).stat().st_size


def test_onnx_with_past_generates_what_the_checkpoint_generates(trained, tmp_path):
    """Greedy decoding of two prompts of different lengths (left-padded, attention_mask) through the ONNX
    past-key/value graph gives the checkpoint's tokens."""
    from llm_training.export.exporter import ExportOptions, export_checkpoint
    from llm_training.export.onnx import OnnxRunner
    from llm_training.model.generate import Sampling, generate_tokens

    checkpoint, _ = trained
    result = export_checkpoint(
        checkpoint, ExportOptions(format="onnx", past=True, output=tmp_path / "p.onnx")
    )
    runner = OnnxRunner(result.export_path, ["CPUExecutionProvider"])
    assert runner.has_past and "past_key_values.1.value" in runner.input_names
    trained_model = load_trained(checkpoint)
    prompts = [trained_model.tokenizer.encode("ROMEO:\nWhat light"), trained_model.tokenizer.encode("Enter")]
    expected = generate_tokens(trained_model.model, prompts, Sampling(max_new_tokens=12, temperature=0))
    width = max(map(len, prompts))
    ids = np.zeros((2, width), dtype=np.int64)
    mask = np.zeros((2, width), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    logits, past = runner.run(ids, mask)
    got = [[], []]
    for _ in range(12):
        nxt = logits[:, -1].argmax(-1)
        for i in range(2):
            got[i].append(int(nxt[i]))
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        logits, past = runner.run(nxt[:, None], mask, past)
    eot = trained_model.tokenizer.eot_id
    assert [g[: len(e)] for g, e in zip(got, expected, strict=True)] == expected
    assert all(len(e) == 12 or g[len(e)] == eot for g, e in zip(got, expected, strict=True))


def test_model_exporter_as_in_the_usage_guide_with_pruning(trained, tmp_path, monkeypatch):
    from llm_training import EventBus, ModelExporter, ModelExporterInput
    from llm_training.export.runtime import load_model

    checkpoint, text = trained
    monkeypatch.chdir(tmp_path)
    bus = EventBus()
    seen = []
    bus.subscribe("export_done", seen.append)
    exporter = ModelExporter(bus)
    onnx_output = exporter.export(ModelExporterInput(checkpoint_path=str(checkpoint), export_format="onnx",
                                                     optimization={"quantization": "int8", "pruning": False}))  # fmt: skip
    assert onnx_output.export_path == tmp_path / "exports" / "model_final.onnx" or str(
        onnx_output.export_path
    ) == ("exports/model_final.onnx")
    assert (tmp_path / "exports" / "model_final.onnx").is_file() and seen[0].payload["format"] == "onnx"
    ts = exporter.export(ModelExporterInput(checkpoint_path=str(checkpoint), export_format="torchscript",
                                            optimization={"quantization": "none"}))  # fmt: skip
    assert (tmp_path / ts.export_path).is_file()
    pruned = exporter.export(ModelExporterInput(checkpoint_path=str(checkpoint), export_format="safetensors",
                                                optimization={"pruning": 0.4}, output_path="pruned/model.safetensors",
                                                validation_data=str(text)))  # fmt: skip
    report = pruned.pruning
    assert (
        report["pruned_sparsity"] == pytest.approx(0.4, abs=0.01) and 0.2 < report["overall_sparsity"] < 0.4
    )
    assert report["perplexity_after"] >= report["perplexity_before"] * 0.98
    loaded = load_model(tmp_path / "pruned" / "model.safetensors")
    up = loaded.module.blocks[0].mlp.up.weight
    assert float((up == 0).float().mean()) == pytest.approx(0.4, abs=0.01)
    # every export loads for inference with the checkpoint's tokenizer and the same predictions
    trained_model, ids, logits = reference(checkpoint)
    for path in ("exports/model_final.onnx", ts.export_path):
        m = load_model(tmp_path / path)
        assert m.tokenizer.encode(TEXT) == ids[0].tolist()
        assert (m.module(ids) - logits).abs().max() < (0.5 if str(path).endswith(".onnx") else 1e-5)


def test_trainer_export(trained, tmp_path):
    from llm_training import Trainer

    checkpoint, _ = trained
    result = Trainer(output_dir=str(tmp_path)).export(format="onnx", output_path=str(tmp_path / "exports" / "model.onnx"),
                                                      checkpoint=str(checkpoint))  # fmt: skip
    assert result.export_path.is_file() and result.check["runtime"] == "onnxruntime"


def test_bad_inputs(trained, tmp_path):
    from llm_training.cli.export import main as export_main

    checkpoint, _ = trained
    # in this process: each fails before any work (the subprocess runs below show the real exit status)
    assert_user_error(call_cli(export_main, ["--checkpoint", str(tmp_path / "nope.pt"), "--format", "onnx"]),
                      "nope.pt")  # fmt: skip
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(checkpoint.read_bytes()[:50_000])
    assert_user_error(call_cli(export_main, ["--checkpoint", str(damaged), "--format", "onnx"]), "damaged.pt")
    assert_user_error(call_cli(export_main, ["--checkpoint", str(checkpoint), "--format", "tflite"]),
                      "unknown export format 'tflite'", "onnx, torchscript, safetensors, hf, gguf")  # fmt: skip
    assert_user_error(call_cli(export_main, ["--checkpoint", str(checkpoint), "--format", "torchscript", "--quantize",
                                             "int8"]), "not available for torchscript", "none, fp16")  # fmt: skip
    # an existing output is kept as it was, unless --overwrite
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"precious")
    args = [*EXPORT, "--checkpoint", str(checkpoint), "--format", "safetensors", "--output", str(target)]
    assert_user_error(run_cli(args, tmp_path), "exists", "--overwrite")
    assert target.read_bytes() == b"precious" and not (tmp_path / "config.json").exists()
    assert run_cli([*args, "--overwrite"], tmp_path).returncode == 0 and target.stat().st_size > 1000
    # a check that fails is an error, and nothing is written
    proc = run_cli([*EXPORT, "--checkpoint", str(checkpoint), "--format", "onnx", "--quantize", "int8",
                    "--output", str(tmp_path / "q.onnx"), "--max-perplexity-increase", "-0.5"], tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: onnx int8 export check failed: perplexity")
    assert not (tmp_path / "q.onnx").exists() and not list(tmp_path.glob(".q.onnx*"))


def test_infer_and_evaluate_take_exported_models(trained, tmp_path):
    """On the CPU (a GPU runs the checkpoint in bf16), ``llm-infer`` and ``llm-evaluate`` on ONNX (with past: KV cache through onnxruntime; without: rows
    recomputed) and TorchScript give the checkpoint's greedy completions and metrics."""
    from llm_training.export.exporter import ExportOptions, export_all, export_checkpoint

    checkpoint, text = trained
    export_all(checkpoint, ["onnx", "torchscript"], tmp_path / "e")
    export_checkpoint(
        checkpoint, ExportOptions(format="onnx", past=False, output=tmp_path / "e" / "plain.onnx")
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["ROMEO:", "To be, or not", "Enter", "O"])
    )
    outputs = {}
    for name, model in [("checkpoint", checkpoint), ("onnx", tmp_path / "e" / "model.onnx"),
                        ("plain", tmp_path / "e" / "plain.onnx"), ("ts", tmp_path / "e" / "model.torchscript.pt")]:  # fmt: skip
        out = tmp_path / f"{name}.jsonl"
        proc = run_cli(["-m", "llm_training.cli.infer", "--model", str(model), "--input", str(prompts), "--output",
                        str(out), "--batch-size", "3", "--max-new-tokens", "16", "--device", "cpu"], tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outputs[name] = out.read_text()
    assert len(outputs["checkpoint"].splitlines()) == 4
    assert outputs["onnx"] == outputs["checkpoint"] == outputs["plain"] == outputs["ts"]
    scores = {}
    for name, model in [("checkpoint", checkpoint), ("onnx", tmp_path / "e" / "model.onnx")]:
        out = tmp_path / f"{name}.json"
        proc = run_cli(["-m", "llm_training.cli.evaluate", "--model-path", str(model), "--test-data", str(text),
                        "--output", str(out), "--device", "cpu"], tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        scores[name] = json.loads(out.read_text())
    assert scores["onnx"]["perplexity"] == pytest.approx(scores["checkpoint"]["perplexity"], rel=1e-4)


def test_fp16_torchscript_and_hugging_face_folders_store_fp16(trained, tmp_path):
    """--quantize fp16 halves what is stored (the self-check still passes within fp16's tolerance)."""
    from safetensors import safe_open

    from llm_training.export.exporter import ExportOptions, export_checkpoint
    from llm_training.export.torchscript import load_torchscript

    checkpoint, text = trained
    script = export_checkpoint(checkpoint, ExportOptions(format="torchscript", quantize="fp16",
                                                         output=str(tmp_path / "m.ts.pt"), validation_data=str(text)))  # fmt: skip
    module, _ = load_torchscript(script.export_path)
    assert {p.dtype for p in module.parameters()} == {torch.float16} and script.check["top1_agreement"] > 0.9
    folder = export_checkpoint(checkpoint, ExportOptions(format="hf", quantize="fp16", output=str(tmp_path / "hf"),
                                                         validation_data=str(text)))  # fmt: skip
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}  # noqa: SIM118
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float16"
    assert folder.size_bytes < 0.6 * folder.source_bytes


def test_onnx_fp16_with_past_passes_its_check(trained, tmp_path):
    """fp16 on the default graph (past keys and values): onnxruntime's converter leaves the graph
    unsorted, which the ONNX checker refused; the written file runs with a past and stays close."""
    from llm_training.export.exporter import ExportOptions, export_checkpoint
    from llm_training.export.onnx import OnnxRunner

    checkpoint, text = trained
    result = export_checkpoint(checkpoint, ExportOptions(format="onnx", quantize="fp16", output=tmp_path / "f16.onnx",
                                                         validation_data=text))  # fmt: skip
    assert (
        result.check["max_logit_diff"] <= result.check["tolerance"] and result.check["top1_agreement"] > 0.9
    )
    assert abs(result.check["perplexity_change"]) < 0.01
    runner = OnnxRunner(result.export_path, ["CPUExecutionProvider"])
    _, ids, logits = reference(checkpoint)
    first, past = runner.run(ids[:, :-1].numpy())  # the prompt, then one token through the past
    last, _ = runner.run(ids[:, -1:].numpy(), past=past)
    assert runner.has_past and np.abs(first - logits[:, :-1].numpy()).max() < 0.05
    assert np.abs(last[:, -1] - logits[:, -1].numpy()).max() < 0.05


def test_output_folders_and_names_of_any_suffix(trained, tmp_path):
    """``--format`` with ``--output-dir`` (a folder not there yet) writes the format's file inside it; a
    safetensors file named ``s.bin`` is checked (and later loaded) as safetensors, not guessed by name."""
    from llm_training.export.exporter import ExportOptions, export_checkpoint
    from llm_training.export.runtime import load_model

    checkpoint, _ = trained
    proc = run_cli([*EXPORT, "--checkpoint", str(checkpoint), "--format", "safetensors", "--output-dir",
                    str(tmp_path / "new") + "/"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "new" / "model.safetensors").is_file() and "new/model.safetensors" in proc.stdout
    result = export_checkpoint(checkpoint, ExportOptions(format="safetensors", output=tmp_path / "s.bin"))
    assert result.export_path == tmp_path / "s.bin" and result.check["max_logit_diff"] == 0
    loaded = load_model(tmp_path / "s.bin")
    assert loaded.kind == "safetensors" and loaded.cfg.num_kv_heads == 2
    hf = export_checkpoint(checkpoint, ExportOptions(format="hf", output_dir=tmp_path / "dir"))
    assert hf.export_path == tmp_path / "dir" / "hf" and (tmp_path / "dir" / "hf" / "config.json").is_file()


def test_int8_notice_and_missing_validation_text(trained, tmp_path, caplog):
    from llm_training.errors import UserError
    from llm_training.export.exporter import ExportOptions, export_all, export_checkpoint

    checkpoint, _ = trained
    with caplog.at_level("WARNING", logger="llm_training.export"):
        results = export_all(checkpoint, ["torchscript", "gguf"], tmp_path / "q", quantize="int8")
    assert [r.quantize for r in results] == ["none", "int8"]
    assert "--quantize int8: torchscript has no int8; written in fp32" in caplog.text
    # a missing validation file is reported before anything is built or written
    with pytest.raises(UserError, match="--validation-data .*nope.txt: file not found"):
        export_checkpoint(checkpoint, ExportOptions(format="onnx", output=tmp_path / "v.onnx",
                                                    validation_data=tmp_path / "nope.txt"))  # fmt: skip
    assert not list(tmp_path.glob("*v.onnx*"))


def test_gguf_pads_the_vocabulary_to_the_models_rows(tmp_path):
    """Training rounds the model's vocabulary up to a multiple of 64 (400 tokens -> 448 rows): the GGUF
    token list has one entry per row (the rest ``[PAD<i>]``, UNUSED), as llama.cpp's converter writes it.
    transformers' GGUF loader reads it; Llama style in f32 agrees tightly (the query/key permutation)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_training.config import ModelConfig
    from llm_training.data.tokenizer import Tokenizer
    from llm_training.export.gguf import load_gguf, save_gguf
    from llm_training.model.transformer import Transformer

    tokenizer = Tokenizer.train([r["text"][:40_000] for r in corpus_records("shakespeare", 2)], 400)
    assert tokenizer.vocab_size == 400
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                      vocab_size=448, max_seq_length=64, rope_theta=50_000.0)  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # trained-looking weights: norms away from 1
            p.add_(torch.randn_like(p) * 0.05)
    save_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 448 == reader.fields["llama.vocab_size"].contents()
    assert tokens[400:] == [f"[PAD{i}]" for i in range(400, 448)]
    assert set(types[400:]) == {gguf.TokenType.UNUSED} and gguf.TokenType.UNUSED not in types[:400]
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        logits = model(ids)
        theirs = AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file="m.gguf", dtype=torch.float32
        ).eval()
        assert theirs.config.vocab_size == 448 and (theirs(ids).logits - logits).abs().max() < 1e-4
        assert (
            AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")(TEXT)["input_ids"] == ids[0].tolist()
        )
        back, back_tok = load_gguf(tmp_path / "m.gguf")  # and back: the padding rows are no tokens
        assert torch.equal(back.eval()(ids), logits) and back_tok.vocab_size == 400
        assert back_tok.encode(TEXT) == ids[0].tolist()


def test_training_continues_from_an_exported_folder(trained, tmp_path):
    """The usage guide's low-level API on a Hugging Face folder: ``ModelInitializer`` imports it with its
    tokenizer, and training on the same prepared data starts at the checkpoint's validation loss (not at
    ln(vocabulary), where a new model starts) and goes on from there."""
    import math

    import llm_training as lib
    from llm_training.api.model import check_data_tokenizer
    from llm_training.data.tokenizer import Tokenizer
    from llm_training.errors import ConfigError
    from llm_training.export.exporter import ExportOptions, export_checkpoint
    from llm_training.train.checkpoint import load_checkpoint

    checkpoint, text = trained
    data = checkpoint.parents[2] / "data"  # where train_on_plays prepared the plays
    export_checkpoint(checkpoint, ExportOptions(format="hf", output=tmp_path / "hf"))
    model = lib.ModelInitializer().initialize(
        lib.ModelInitializerInput(initialization={"method": "pretrained", "path": str(tmp_path / "hf")})
    )
    assert model.tokenizer.fingerprint == Tokenizer.load(data / "vocab.json").fingerprint
    check_data_tokenizer(model, data)  # the folder's tokenizer made this data: accepted
    loader = lib.DataLoader().create_loader(
        lib.DataLoaderInput(dataset_path=str(data / "train.json"), batch_size=16)
    )
    result = lib.TrainingOrchestrator().train(
        lib.TrainingOrchestratorInput(model_id=model.model_id, training_config={
            "output_dir": str(tmp_path / "run"), "max_steps": 3, "sample_tokens": 0, "eval_interval": 1000,
            "logging.progress_bar": False}),
        data_loader_output=loader,
    )  # fmt: skip
    before = load_checkpoint(checkpoint)["metrics"]["val_loss"]
    assert result.result.first_val_loss == pytest.approx(before, rel=1e-4) and before < math.log(512) - 1
    assert result.steps == 3 and result.val_loss < before + 0.05
    # data tokenized by another tokenizer: the same ids would mean other tokens
    other = tmp_path / "other"
    other.mkdir()
    Tokenizer.train([text.read_text()[:20_000]], 300).save(other / "vocab.json")
    with pytest.raises(ConfigError, match="another tokenizer .*--tokenizer .*hf/tokenizer.json"):
        check_data_tokenizer(model, other)
    # and the orchestrator refuses such data before training a step
    import shutil

    shutil.copytree(data, tmp_path / "retokenized")
    shutil.copy(other / "vocab.json", tmp_path / "retokenized" / "vocab.json")
    loader = lib.DataLoader().create_loader(
        lib.DataLoaderInput(dataset_path=str(tmp_path / "retokenized" / "train.json"), batch_size=16)
    )
    with pytest.raises(ConfigError, match="another tokenizer"):
        lib.TrainingOrchestrator().train(
            lib.TrainingOrchestratorInput(model_id=model.model_id, training_config={
                "output_dir": str(tmp_path / "run2"), "max_steps": 1}),
            data_loader_output=loader,
        )  # fmt: skip
    assert not (tmp_path / "run2" / "checkpoints").exists()
