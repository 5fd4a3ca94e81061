"""llm_training: from raw text to a trained language model.

Importing the package is cheap: names are loaded on first use, so ``import llm_training`` touches no
device, file or network and does not import PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "main": "llm_training.cli.main_job",
    "DataPreparationPipeline": "llm_training.api.data",
    "DataSourceConnector": "llm_training.data.sources",
    "DataSourceConnectorOutput": "llm_training.data.sources",
    "Document": "llm_training.data.sources",
    "Config": "llm_training.config",
    "ModelInitializer": "llm_training.api.model",
    "ModelInitializerInput": "llm_training.api.model",
    "ModelInitializerOutput": "llm_training.api.model",
    "load_config": "llm_training.config",
    "load_checkpoint": "llm_training.train.checkpoint",
    "ErrorRecovery": "llm_training.train.recovery",
    "RecoveryExhausted": "llm_training.train.recovery",
    "ModelCheckpointer": "llm_training.api.training",
    "Trainer": "llm_training.api.trainer",
    "DataLoader": "llm_training.api.training",
    "DataLoaderInput": "llm_training.api.training",
    "DataLoaderOutput": "llm_training.api.training",
    "TrainingOrchestrator": "llm_training.api.training",
    "TrainingOrchestratorInput": "llm_training.api.training",
    "TrainingOrchestratorOutput": "llm_training.api.training",
    "EventBus": "llm_training.events",
    "UserError": "llm_training.errors",
    "ModelServer": "llm_training.api.serve",
    "MetricsDashboard": "llm_training.monitor.dashboard",
    "MultiModalPreprocessor": "llm_training.multimodal.preprocess",
    "Pipeline": "llm_training.api.pipeline",
    "PipelineError": "llm_training.api.pipeline",
    "ModelExporter": "llm_training.api.export",
    "ModelExporterInput": "llm_training.api.export",
    "ModelExporterOutput": "llm_training.api.export",
    "EventBusAdaptor": "llm_training.events",
    "ComputeResourceManager": "llm_training.api.resources",
    "LossCalculator": "llm_training.api.losses",
    "LossCalculatorInput": "llm_training.api.losses",
    "LossCalculatorOutput": "llm_training.api.losses",
    "MetricsCollector": "llm_training.api.metrics",
    "MetricsCollectorInput": "llm_training.api.metrics",
    "MetricsCollectorOutput": "llm_training.api.metrics",
    "ConfigurationAdaptor": "llm_training.api.configuration",
}

__all__ = [
    "ComputeResourceManager",
    "Config",
    "ConfigurationAdaptor",
    "DataLoader",
    "DataLoaderInput",
    "DataLoaderOutput",
    "DataPreparationPipeline",
    "DataSourceConnector",
    "DataSourceConnectorOutput",
    "Document",
    "ErrorRecovery",
    "EventBus",
    "EventBusAdaptor",
    "LossCalculator",
    "LossCalculatorInput",
    "LossCalculatorOutput",
    "MetricsCollector",
    "MetricsCollectorInput",
    "MetricsCollectorOutput",
    "MetricsDashboard",
    "MultiModalPreprocessor",
    "ModelCheckpointer",
    "ModelExporter",
    "ModelExporterInput",
    "ModelExporterOutput",
    "ModelInitializer",
    "ModelInitializerInput",
    "ModelInitializerOutput",
    "ModelServer",
    "Pipeline",
    "PipelineError",
    "RecoveryExhausted",
    "Trainer",
    "TrainingOrchestrator",
    "TrainingOrchestratorInput",
    "TrainingOrchestratorOutput",
    "UserError",
    "__version__",
    "load_checkpoint",
    "load_config",
    "main",
]

if TYPE_CHECKING:  # pragma: no cover
    from llm_training.api.configuration import ConfigurationAdaptor
    from llm_training.api.data import DataPreparationPipeline
    from llm_training.api.export import ModelExporter, ModelExporterInput, ModelExporterOutput
    from llm_training.api.losses import LossCalculator, LossCalculatorInput, LossCalculatorOutput
    from llm_training.api.metrics import MetricsCollector, MetricsCollectorInput, MetricsCollectorOutput
    from llm_training.api.model import ModelInitializer, ModelInitializerInput, ModelInitializerOutput
    from llm_training.api.pipeline import Pipeline, PipelineError
    from llm_training.api.resources import ComputeResourceManager
    from llm_training.api.serve import ModelServer
    from llm_training.api.trainer import Trainer
    from llm_training.api.training import (
        DataLoader,
        DataLoaderInput,
        DataLoaderOutput,
        ModelCheckpointer,
        TrainingOrchestrator,
        TrainingOrchestratorInput,
        TrainingOrchestratorOutput,
    )
    from llm_training.cli.main_job import main
    from llm_training.config import Config, load_config
    from llm_training.data.sources import DataSourceConnector, DataSourceConnectorOutput, Document
    from llm_training.errors import UserError
    from llm_training.events import EventBus, EventBusAdaptor
    from llm_training.monitor.dashboard import MetricsDashboard
    from llm_training.multimodal.preprocess import MultiModalPreprocessor
    from llm_training.train.checkpoint import load_checkpoint
    from llm_training.train.recovery import ErrorRecovery, RecoveryExhausted


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llm_training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
