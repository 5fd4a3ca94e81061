"""The usage guide's training classes: ``DataLoader``, ``TrainingOrchestrator`` and ``ModelCheckpointer``,
thin layers over the same loader, training loop and checkpoint files that the commands use."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_training.errors import ConfigError, UserError

# loaders by id, so a TrainingOrchestratorInput can name one (models live in api.model.MODELS)
LOADERS: dict[str, DataLoaderOutput] = {}


@dataclass
class DataLoaderInput:
    dataset_path: str | Path = (
        "prepared_data/train.json"  # a manifest written by data preparation, or its folder
    )
    batch_size: int = 32
    shuffle: bool = True
    num_workers: int = 0  # windows are read from memory-mapped shards in the loop: no worker processes needed
    prefetch_factor: int = 2
    seed: int = 42
    # tokens a window; None: iterating gives the length the data was prepared for, training the model's
    # context (a shorter length trains on shorter windows, as a curriculum does)
    max_seq_length: int | None = None


@dataclass
class DataLoaderOutput:
    """A prepared dataset ready to batch. ``len(loader)`` batches an epoch; iterating gives them as
    dictionaries of ``input_ids`` and ``labels`` (labels are the inputs shifted by one token), a new epoch
    (a new shuffle) each time it is iterated."""

    loader_id: str
    data_dir: Path
    dataset_path: Path
    batch_size: int
    shuffle: bool
    num_tokens: int
    vocab_size: int
    seed: int = 42
    max_seq_length: int | None = None
    prepared_seq_length: int = 2048
    _batches: Any = field(default=None, repr=False, compare=False)

    @property
    def batches(self):
        """The ``BatchLoader`` over the training windows (made at first use)."""
        if self._batches is None:
            from llm_training.data.loader import BatchLoader, TokenDataset

            windows = TokenDataset(self.dataset_path, self.max_seq_length or self.prepared_seq_length)
            self._batches = BatchLoader(windows, self.batch_size, shuffle=self.shuffle, seed=self.seed)
        return self._batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class DataLoader:
    """Checks a prepared dataset and records how to batch it; training builds the resumable loader."""

    def __init__(self, event_bus=None) -> None:
        self.event_bus = event_bus

    def create_loader(self, spec: DataLoaderInput | None = None, **options: Any) -> DataLoaderOutput:
        """Check a prepared dataset (its train.json or folder) and return a DataLoaderOutput: registered by loader_id, iterable as batches, len() batches an epoch."""
        from llm_training.data.prepare import read_manifest

        spec = spec or DataLoaderInput(**options)
        path = Path(spec.dataset_path)
        manifest_path = path / "train.json" if path.is_dir() else path
        if not manifest_path.is_file():
            raise UserError(
                f"dataset_path {path}: no prepared data there (expected train.json from llm-prepare-data)"
            )
        if spec.batch_size < 1:
            raise ConfigError(f"DataLoaderInput.batch_size must be at least 1, got {spec.batch_size}")
        if spec.max_seq_length is not None and spec.max_seq_length < 1:
            raise ConfigError(f"DataLoaderInput.max_seq_length must be at least 1, got {spec.max_seq_length}")
        manifest = read_manifest(manifest_path)
        data_dir = manifest_path.parent
        for needed in ("validation.json", "vocab.json"):
            if not (data_dir / needed).is_file():
                raise UserError(
                    f"{data_dir}: {needed} is missing; prepare the data again with llm-prepare-data"
                )
        output = DataLoaderOutput(
            loader_id=str(uuid.uuid4()),
            data_dir=data_dir,
            dataset_path=manifest_path,
            batch_size=spec.batch_size,
            shuffle=spec.shuffle,
            num_tokens=int(manifest["num_tokens"]),
            vocab_size=int(manifest.get("vocab_size", 0)),
            seed=spec.seed,
            max_seq_length=spec.max_seq_length,
            prepared_seq_length=int(manifest.get("max_seq_length") or 2048),
        )
        LOADERS[output.loader_id] = output
        if self.event_bus is not None:
            self.event_bus.publish(
                "loader_created", loader_id=output.loader_id, dataset_path=str(manifest_path)
            )
        return output


@dataclass
class TrainingOrchestratorInput:
    model_id: str | None = None  # from ModelInitializer (or an earlier train); None builds the config's model
    loader_id: str | None = None  # from DataLoader.create_loader
    # training.* keys (num_epochs, learning_rate, optimizer, max_steps, ...), plus "output_dir" and dotted
    # "section.key" names for any other config key
    training_config: dict = field(default_factory=dict)
    config_file: str | None = None  # a YAML config layered under training_config


@dataclass
class TrainingOrchestratorOutput:
    status: str  # completed | interrupted
    model_id: str
    steps: int
    final_checkpoint: Path
    val_loss: float
    val_bpb: float
    result: Any  # the loop's TrainResult


class TrainingOrchestrator:
    """``train(TrainingOrchestratorInput(...), data_loader_output=..., checkpoint=...)``.

    ``checkpoint``: a dict from ``load_checkpoint``, a checkpoint path, or "auto" (the newest valid one in
    ``<output_dir>/checkpoints``): training continues from it exactly.
    """

    def __init__(self, event_bus=None) -> None:
        self.event_bus = event_bus

    def train(
        self,
        spec: TrainingOrchestratorInput,
        data_loader_output: DataLoaderOutput | None = None,
        checkpoint: dict | str | Path | None = None,
    ) -> TrainingOrchestratorOutput:
        """Train the model of model_id (or the config's) on the loader's data; returns status, model_id, steps, final_checkpoint and validation figures."""
        from llm_training.api.jobs import run_training_on
        from llm_training.api.model import MODELS, check_data_tokenizer, register_model
        from llm_training.config import load_config
        from llm_training.data.tokenizer import Tokenizer

        loader = data_loader_output if data_loader_output is not None else LOADERS.get(spec.loader_id or "")
        if loader is None:
            raise UserError("TrainingOrchestrator.train needs data_loader_output (or a known loader_id)")
        model = None
        values = {
            k if "." in k or k == "output_dir" else f"training.{k}": v
            for k, v in spec.training_config.items()
        }
        values.setdefault("training.batch_size", loader.batch_size)
        if loader.max_seq_length is not None:
            values.setdefault("training.seq_length", loader.max_seq_length)
        values.setdefault("training.seed", loader.seed)
        if spec.model_id is not None:
            entry = MODELS.get(spec.model_id)
            if entry is None:
                raise UserError(
                    f"model_id {spec.model_id!r} is unknown; create it with ModelInitializer first"
                )
            model = entry.model
            check_data_tokenizer(entry, loader.data_dir)  # pretrained weights need the data in their tokens
            values.update({f"model.{k}": v for k, v in vars(entry.config).items()})
        cfg = load_config(spec.config_file, cli=values)
        if model is not None and loader.vocab_size > model.cfg.vocab_size:
            raise ConfigError(
                f"the model's vocab_size ({model.cfg.vocab_size}) is smaller than the data's tokenizer "
                f"({loader.vocab_size}); initialize the model with vocab_size >= {loader.vocab_size}"
            )
        result = run_training_on(
            cfg, loader.data_dir, resume_from=checkpoint, model=model, bus=self.event_bus
        )
        if spec.model_id is None:  # a new model: it now speaks the data's tokenizer
            vocab = Path(loader.data_dir) / "vocab.json"
            model_id = register_model(result.model, cfg.model, Tokenizer.load(vocab), str(vocab))
        else:
            model_id = spec.model_id
        return TrainingOrchestratorOutput(
            status=result.status,
            model_id=model_id,
            steps=result.steps,
            final_checkpoint=result.final_checkpoint,
            val_loss=result.val_loss,
            val_bpb=result.val_bpb,
            result=result,
        )


class ModelCheckpointer:
    """Save, find, load, clean up and back up checkpoints in one folder (the format of train/checkpoint.py)."""

    def __init__(self, event_bus=None, checkpoint_dir: str | Path = "checkpoints") -> None:
        self.event_bus = event_bus
        self.checkpoint_dir = Path(checkpoint_dir)

    def save(
        self,
        model,
        optimizer=None,
        step: int = 0,
        name: str | None = None,
        val_loss: float | None = None,
        **extra: Any,
    ) -> Path:
        """Write ``model_step_<step>.pt`` (or ``name``) with the model, optimizer and ``extra`` values."""
        import dataclasses

        from llm_training import events
        from llm_training.train.checkpoint import rng_state, save_checkpoint

        model_cfg = getattr(model, "cfg", None)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "step": step,
            "rng": rng_state(),
            "config": {"model": dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else {}},
            **extra,
        }
        meta = {"kind": "step" if name is None else "named", "step": step}
        if val_loss is not None:
            meta["val_loss"] = float(val_loss)
        path = save_checkpoint(self.checkpoint_dir / (name or f"model_step_{step}.pt"), state, meta)
        if self.event_bus is not None:
            self.event_bus.publish(events.CHECKPOINT_SAVED, path=str(path), **meta)
        return path

    def load(self, path: str | Path = "auto", map_location: str = "cpu") -> dict:
        """A checkpoint by path, or "auto": the newest one in the folder that passes its checksum."""
        from llm_training.train.checkpoint import find_resume, load_checkpoint

        if str(path) != "auto":
            return load_checkpoint(path, map_location=map_location)
        found, state = find_resume("auto", self.checkpoint_dir)
        if state is None:
            raise UserError(f"{self.checkpoint_dir}: no valid checkpoint to load")
        return state

    def latest(self) -> Path | None:
        """The newest checkpoint in the folder, or None."""
        from llm_training.train.checkpoint import latest_checkpoint

        return latest_checkpoint(self.checkpoint_dir)

    def list(self) -> list:
        """The checkpoints a run can continue from (step files and model_final.pt), newest first."""
        from llm_training.train.checkpoint import resume_candidates

        return resume_candidates(self.checkpoint_dir)

    def cleanup(self, keep_last: int | None = 2, keep_best: int = 0, dry_run: bool = False):
        """Apply retention (see ``llm-cleanup``); returns the plan (``.remove`` lists what went)."""
        from llm_training.train.retention import apply_cleanup, plan_cleanup

        plan = plan_cleanup(self.checkpoint_dir, keep_last, keep_best)
        if not dry_run:
            apply_cleanup(plan)
        return plan

    def backup(self, path: str | Path, destination: str | Path) -> Path:
        """Copy a checkpoint and its checksum file to ``destination`` (a folder) and verify the copy."""
        from llm_training.fileio import atomic_path, check_output_file
        from llm_training.train.checkpoint import sidecar_path, verify_checkpoint

        source = Path(path)
        problem = verify_checkpoint(source) if source.is_file() else "not found"
        if problem:
            raise UserError(f"{source}: {problem}; not backed up")
        target_dir = Path(destination)
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / source.name
        for path in (target, sidecar_path(target)):
            check_output_file(path, "backup", [source, sidecar_path(source)])
            if os.path.lexists(path):  # never replaces a file it did not write (another backup, the user's)
                raise UserError(f"backup {path}: exists; choose another destination, or move it away first")
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        if sidecar_path(source).is_file():
            with atomic_path(sidecar_path(target)) as side:
                shutil.copyfile(sidecar_path(source), side)
        problem = verify_checkpoint(target)
        if problem:
            raise UserError(f"backup {target}: {problem}")
        return target
