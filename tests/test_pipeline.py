"""``Pipeline``: the usage guide's mid-level API on real text, stage after stage; a failing stage is named and
a second run starts at it, reusing what the earlier stages produced."""

from __future__ import annotations

import json
import math

import pytest

from conftest import corpus_records

TINY = {"model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4,
        "model.max_seq_length": 64, "training.batch_size": 16, "training.sample_tokens": 0,
        "training.eval_interval": 1000, "logging.progress_bar": False}  # fmt: skip


@pytest.fixture
def plays(tmp_path):
    path = tmp_path / "plays.jsonl"
    records = corpus_records("shakespeare", 4, lambda r: r["id"].endswith("_gut"))
    path.write_text("".join(json.dumps({"id": r["id"], "text": r["text"][:50_000]}) + "\n" for r in records))
    return path


def test_the_guide_pipeline_runs_every_stage_on_the_one_before(plays, tmp_path):
    pytest.importorskip("onnxruntime")
    from llm_training import Pipeline

    pipeline = Pipeline(output_dir=tmp_path / "out")
    pipeline.add_stage("data_collection", source=str(plays))
    pipeline.add_stage("preprocessing", vocab_size=512)
    pipeline.add_stage("training", num_epochs=1, max_steps=40, **TINY)
    pipeline.add_stage("evaluation", metrics=["perplexity", "accuracy", "loss"])
    pipeline.add_stage("export", format="onnx")
    results = pipeline.run()
    assert results["data_collection"]["documents"] == 4
    assert results["preprocessing"]["train_tokens"] > 10_000
    train_results, eval_results = results["training"], results["evaluation"]
    assert train_results["status"] == "completed" and train_results["steps"] == 40
    # evaluated on the prepared validation split: the same loss the training run reported for it
    assert eval_results["data_kind"] == "prepared" and eval_results["perplexity"] == pytest.approx(
        math.exp(eval_results["loss"])
    )
    assert eval_results["loss"] == pytest.approx(train_results["val_loss"], rel=0.05)
    assert 0 < eval_results["accuracy"] < 1
    assert (tmp_path / "out" / "exports" / "model.onnx").is_file() and results["export"]["check"][
        "max_logit_diff"
    ] < 1e-3


def test_a_failed_stage_is_named_and_the_next_run_starts_there(plays, tmp_path):
    from llm_training import Pipeline, PipelineError, UserError

    def pipeline(fmt: str):
        p = Pipeline(output_dir=tmp_path / "out")
        p.add_stage("data_collection", source=str(plays))
        p.add_stage("preprocessing", vocab_size=512)
        p.add_stage("training", max_steps=20, **TINY)
        p.add_stage("export", format=fmt)
        return p

    with pytest.raises(
        PipelineError, match="pipeline stage 'export' failed: unknown export format 'tflite'"
    ) as err:
        pipeline("tflite").run()
    assert set(err.value.results) == {"data_collection", "preprocessing", "training"}
    checkpoint = err.value.results["training"]["final_checkpoint"]
    before = (tmp_path / "out" / "run" / "checkpoints" / "model_final.pt").stat().st_mtime_ns
    results = pipeline("safetensors").run()  # training is not run again
    assert results["training"]["final_checkpoint"] == checkpoint
    assert (tmp_path / "out" / "run" / "checkpoints" / "model_final.pt").stat().st_mtime_ns == before
    assert (tmp_path / "out" / "exports" / "model.safetensors").is_file()
    # asked to, it runs again from a stage
    again = pipeline("safetensors").run(start_from="training")
    assert (tmp_path / "out" / "run" / "checkpoints" / "model_final.pt").stat().st_mtime_ns != before
    assert again["export"]["export_path"].endswith("model.safetensors")
    with pytest.raises(UserError, match="unknown pipeline stage 'tokenize'"):
        Pipeline().add_stage("tokenize")
    with pytest.raises(PipelineError, match="'data_collection' failed: .*no documents|not found"):
        Pipeline(output_dir=tmp_path / "x").add_stage(
            "data_collection", source=str(tmp_path / "none.jsonl")
        ).run()
