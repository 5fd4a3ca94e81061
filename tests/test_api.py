"""The low-level components of the Python API: the loss and metrics components of a custom loop, the data
loader as an iterable of batches, runtime configuration reaching a running training, and the package's
public names (documented, importable, cheap to import)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import llm_training as lib
from conftest import REPO, prepared_plays
from llm_training.errors import ConfigError
from llm_training.monitor.files import step_losses


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_plays(tmp_path_factory.mktemp("apidata"), 2)


def tiny_model(**more):
    arch = {
        "num_layers": 1,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "vocab_size": 400,
        "max_seq_length": 32,
    }
    return lib.ModelInitializer().initialize(lib.ModelInitializerInput(architecture={**arch, **more}))


def test_loader_iterates_batches_of_inputs_and_shifted_labels(prepared):
    loader = lib.DataLoader().create_loader(
        lib.DataLoaderInput(dataset_path=prepared, batch_size=4, max_seq_length=16)
    )
    batches = list(loader)
    assert len(batches) == len(loader) > 3
    first = batches[0]
    assert first["input_ids"].shape == first["labels"].shape == (4, 16)
    assert torch.equal(first["input_ids"][:, 1:], first["labels"][:, :-1])
    again = next(iter(loader))  # the next epoch: another shuffle of the same windows
    assert not torch.equal(again["input_ids"], first["input_ids"])
    with pytest.raises(ConfigError, match="max_seq_length"):
        lib.DataLoader().create_loader(lib.DataLoaderInput(dataset_path=prepared, max_seq_length=0))


def test_loss_calculator_is_the_models_own_loss(prepared):
    model = tiny_model()
    batch = next(iter(lib.DataLoader().create_loader(lib.DataLoaderInput(dataset_path=prepared, batch_size=2,
                                                                         max_seq_length=32))))  # fmt: skip
    logits = model(batch["input_ids"])
    out = lib.LossCalculator().calculate(lib.LossCalculatorInput(predictions=logits, targets=batch["labels"]))
    assert torch.allclose(out.loss_value, model(batch["input_ids"], batch["labels"]), atol=1e-6)
    assert out.num_tokens == 64 and out.perplexity == pytest.approx(
        float(out.loss_value.detach().exp()), rel=1e-5
    )
    out.loss_value.backward()
    assert model.model.lm_head.weight.grad is not None
    calc = lib.LossCalculator()
    each = calc.calculate(predictions=logits.detach(), targets=batch["labels"], reduction="none")
    assert each.loss_value.shape == (2, 32) and each.perplexity is None
    masked = batch["labels"].clone()
    masked[:, :16] = -100
    half = calc.calculate(predictions=logits.detach(), targets=masked)
    assert half.num_tokens == 32 and torch.allclose(
        half.loss_value, each.loss_value[:, 16:].mean(), atol=1e-6
    )
    nll = calc.calculate(
        predictions=logits.detach().log_softmax(-1), targets=batch["labels"], loss_function="nll"
    )
    assert torch.allclose(nll.loss_value, out.loss_value.detach(), atol=1e-5)
    with pytest.raises(ConfigError, match="do not match"):
        calc.calculate(predictions=logits, targets=batch["labels"][:, :5])
    with pytest.raises(ConfigError, match="loss_function 'mse'"):
        calc.calculate(predictions=logits, targets=batch["labels"], loss_function="mse")
    assert model(batch["input_ids"][0]).shape == (32, 400)  # one sequence: logits (T, V)


def test_metrics_collector_keeps_and_publishes():
    bus = lib.EventBusAdaptor()
    metrics = lib.MetricsCollector(bus)
    loss = torch.tensor(2.0, requires_grad=True) * 1.5
    metrics.collect(lib.MetricsCollectorInput(training_id="a", step=1, metrics={"loss": loss, "lr": 0.1}))
    metrics.collect(training_id="a", step=2, metrics={"loss": 2.0, "lr": 0.05})
    assert metrics.history("a", "loss") == [(1, 3.0), (2, 2.0)]
    assert metrics.summary("a")["loss"] == {"last": 2.0, "min": 2.0, "max": 3.0, "mean": 2.5, "count": 2}
    assert [(e.payload["name"], e.payload["value"]) for e in bus.events("metric")][:2] == [
        ("loss", 3.0),
        ("lr", 0.1),
    ]
    with pytest.raises(ConfigError, match="'vec': a tensor of 3 elements"):
        metrics.collect(training_id="a", step=3, metrics={"vec": torch.ones(3)})
    with pytest.raises(ConfigError, match="no metric 'acc'.*loss, lr"):
        metrics.history("a", "acc")


def test_runtime_update_reaches_a_running_training(prepared, tmp_path):
    bus, applied, seen = lib.EventBusAdaptor(), [], []
    config = lib.ConfigurationAdaptor()
    config.watch_config("training.learning_rate", seen.append)

    def at_step(event):
        if event.payload["step"] == 3:
            config.update_config("training", "learning_rate", "1e-5")  # a string, checked as a file's value
            config.update_config("training", "batch_size", 2)  # not safe mid-run: the next run's

    bus.subscribe("step_end", at_step)
    bus.subscribe("config_applied", applied.append)
    trainer = lib.Trainer(data_dir=str(prepared), output_dir=str(tmp_path / "run"), event_bus=bus, max_steps=6,
                          learning_rate=3e-3, warmup_steps=0, lr_schedule="constant", log_interval=1,
                          sample_tokens=0, batch_size=4,
                          **{"model.num_layers": 1, "model.hidden_size": 32, "model.max_seq_length": 32})  # fmt: skip
    trainer.train()
    lrs = {e.payload["step"]: e.payload["lr"] for e in bus.events("step_end")}
    assert [lrs[s] for s in range(1, 7)] == [3e-3] * 3 + [1e-5] * 3
    assert seen == [1e-5] and [(e.payload["key"], e.payload["step"]) for e in applied] == [
        ("training.learning_rate", 4)
    ]
    assert len(step_losses(tmp_path / "run" / "metrics.jsonl")) == 6
    starts = bus.events("run_start")
    assert starts[0].payload["tokens_per_step"] == 4 * 32  # the batch size change waits for the next run
    assert (
        config.get_config("training", "batch_size") == 2
        and config.get_config("training.learning_rate") == 1e-5
    )
    assert lib.load_config().training.batch_size == 2  # the top of the hierarchy for what is resolved next


def test_configuration_errors_are_clear():
    config = lib.ConfigurationAdaptor()
    with pytest.raises(ConfigError, match="did you mean 'training.learning_rate'"):
        config.get_config("training", "learning_rat")
    with pytest.raises(ConfigError, match="unknown config section 'trainig'"):
        config.update_config("trainig", "batch_size", 2)
    with pytest.raises(ConfigError, match="learning_rate must be positive"):
        config.update_config("training", "learning_rate", -1)
    with pytest.raises(ConfigError, match="needs a callable"):
        config.watch_config("training.learning_rate", 3)
    assert config.overrides() == {}  # nothing was stored by the failed updates
    assert isinstance(config.get_config("model"), dict)


def test_public_names_are_documented_and_the_import_is_cheap():
    for name in lib.__all__:
        value = getattr(lib, name)
        if callable(value) and not name.startswith("_"):
            assert (value.__doc__ or "").strip(), f"llm_training.{name} has no docstring"
    code = "import sys, llm_training; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_api_reference_page_is_current():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import api_reference
    finally:
        sys.path.pop(0)
    assert (REPO / "docs" / "api.md").read_text(encoding="utf-8") == api_reference.render(), (
        "docs/api.md is out of date: run python scripts/api_reference.py"
    )
