"""Distributed data-parallel training: this script starts N processes itself (PyTorch's elastic launcher,
as `llm-train --num-gpus N` does); each runs the same TrainingOrchestrator on its share of every batch.
GPUs use NCCL, CPUs gloo, so it runs on a laptop too. Loss curves match one process with the same global
batch. The same training from the shell:

    torchrun --nproc_per_node=4 -m llm_training.main --config config/distributed.yaml
    python examples/03_distributed.py [--tiny] [--processes 2]
"""

import sys

from _common import model_keys, split_sample


def worker(out: str, tiny: bool) -> None:
    """One process: join the group, train on this rank's share, leave the group."""
    from pathlib import Path

    from llm_training import (
        ComputeResourceManager,
        DataLoader,
        DataLoaderInput,
        EventBusAdaptor,
        TrainingOrchestrator,
        TrainingOrchestratorInput,
    )
    from llm_training.config import Config

    bus = EventBusAdaptor()
    resources = Config().resources
    resources.distributed_backend = "auto"  # nccl with GPUs, gloo without
    with ComputeResourceManager(bus, resources) as env:
        loader = DataLoader(bus).create_loader(
            DataLoaderInput(dataset_path=Path(out) / "prepared", batch_size=8)
        )
        result = TrainingOrchestrator(bus).train(
            TrainingOrchestratorInput(training_config={"max_steps": 10 if tiny else 300, "output_dir": f"{out}/run",
                                                       "sample_tokens": 0, **model_keys(tiny)}),
            data_loader_output=loader,
        )  # fmt: skip
        if env.is_main:
            print(f"{env.world_size} processes ({env.backend}): {result.steps} steps, "
                  f"validation loss {result.val_loss:.3f}")  # fmt: skip


def main() -> None:
    import argparse

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from llm_training import DataPreparationPipeline

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--processes", type=int, default=2, help="Processes (one a GPU when there are GPUs).")
    p.add_argument("--out", default="examples_output/03_distributed")
    args = p.parse_args()
    from pathlib import Path

    Path(args.out).mkdir(parents=True, exist_ok=True)
    train_file, _ = split_sample(Path(args.out))
    DataPreparationPipeline(output_dir=Path(args.out) / "prepared", vocab_size=1024).run(
        input_file=str(train_file)
    )
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.processes, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id="example03", max_restarts=0)  # fmt: skip
    elastic_launch(config, worker)(args.out, args.tiny)


if __name__ == "__main__":  # the worker processes import this file: only the launcher runs main()
    sys.exit(main())
