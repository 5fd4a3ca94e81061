"""Write docs/api.md: every public name of ``llm_training`` with its signature and docstring, grouped by the
usage guide's three levels. ``python scripts/api_reference.py`` (a test checks the page is current)."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import llm_training

GROUPS = [
    ("High level", ["main", "Trainer", "load_checkpoint", "ModelServer", "MetricsDashboard"]),
    ("Mid level", ["Pipeline", "PipelineError", "DataPreparationPipeline", "MultiModalPreprocessor"]),
    ("Low level: components and their inputs and outputs", [
        "EventBus", "EventBusAdaptor", "ComputeResourceManager", "DataSourceConnector", "DataSourceConnectorOutput",
        "Document", "DataLoader", "DataLoaderInput", "DataLoaderOutput", "ModelInitializer", "ModelInitializerInput",
        "ModelInitializerOutput", "TrainingOrchestrator", "TrainingOrchestratorInput", "TrainingOrchestratorOutput",
        "LossCalculator", "LossCalculatorInput", "LossCalculatorOutput", "MetricsCollector", "MetricsCollectorInput",
        "MetricsCollectorOutput", "ModelCheckpointer", "ModelExporter", "ModelExporterInput", "ModelExporterOutput",
        "ErrorRecovery", "RecoveryExhausted"]),
    ("Configuration", ["Config", "load_config", "ConfigurationAdaptor"]),
    ("Errors", ["UserError"]),
]  # fmt: skip


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def entry(name: str, obj) -> list[str]:
    out = [f"### `{name}`", ""]
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        out += [f"`{name}{_signature(obj)}`", ""]
        own = _doc(obj)
        if own and not own.startswith(name + "("):  # not the generated signature docstring
            out += [own, ""]
        out += [f"- `{f.name}`: `{f.type}`" for f in dataclasses.fields(obj) if not f.name.startswith("_")]
        out.append("")
    elif inspect.isclass(obj):
        out += [f"`{name}{_signature(obj)}`", "", _doc(obj), ""]
        for method, value in vars(obj).items():
            if method.startswith("_") or not callable(value) and not isinstance(value, property):
                continue
            target = value.fget if isinstance(value, property) else value
            shown = method if isinstance(value, property) else f"{method}{_signature(target)}"
            text = _doc(target).replace("\n", " ")
            out.append(f"- `{shown}`" + (f": {text}" if text else ""))
        out.append("")
    else:
        out += [f"`{name}{_signature(obj)}`", "", _doc(obj), ""]
    return out


def render() -> str:
    listed = [n for _, names in GROUPS for n in names]
    missing = sorted(set(llm_training.__all__) - set(listed) - {"__version__"})
    if missing:
        raise SystemExit(f"scripts/api_reference.py: add {', '.join(missing)} to a group")
    lines = ["# API reference", "", "Every public name of `llm_training` (`from llm_training import ...`), made by",
             "`python scripts/api_reference.py` from the docstrings. The README's Python section shows them in use.", ""]  # fmt: skip
    for title, names in GROUPS:
        lines += [f"## {title}", ""]
        for name in names:
            lines += entry(name, getattr(llm_training, name))
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "docs" / "api.md"
    target.write_text(render(), encoding="utf-8")
    print(f"wrote {target}", file=sys.stderr)
