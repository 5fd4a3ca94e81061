"""``--num-gpus N`` (and ``--nnodes``): start the worker processes through PyTorch's elastic launcher, the
same agent that ``torchrun`` runs, so failures, signals and rendezvous behave as they do there."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

from llm_training.errors import ConfigError, UserError

LAUNCH_FLAGS = {"--num-gpus", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-timeout"}


def add_launch_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--num-gpus",
        type=int,
        help="Processes to start on this node, one per GPU (with --distributed-backend gloo on a machine "
        "without GPUs: CPU processes); training.batch_size is per process.",
    )
    p.add_argument("--distributed-backend", choices=["auto", "nccl", "gloo"], help="Communication backend.")
    p.add_argument("--nnodes", type=int, default=1, help="Machines taking part (each runs this command).")
    p.add_argument(
        "--node-rank", type=int, help="This machine's index, 0 to nnodes-1 (0 hosts the rendezvous)."
    )
    p.add_argument(
        "--rdzv-endpoint",
        help="host:port of node 0 where the nodes meet (several nodes need it; one node uses a free local port).",
    )
    p.add_argument(
        "--rdzv-timeout",
        type=float,
        default=300.0,
        help="Seconds to wait for every node to join before failing.",
    )


def worker_args(argv: list[str]) -> list[str]:
    """The command line without the launcher's own flags (the workers must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def should_launch(args) -> bool:
    inside = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    return not inside and ((args.num_gpus or 1) > 1 or args.nnodes > 1)


def check(args) -> str:
    """The backend the workers will use; errors for impossible requests before anything starts."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = args.distributed_backend or "auto"
    if backend == "auto":
        backend = "nccl" if visible else "gloo"
    n = args.num_gpus or 1
    if n < 1 or args.nnodes < 1:
        raise ConfigError("--num-gpus and --nnodes must be at least 1")
    if backend == "nccl" and n > visible:
        raise ConfigError(
            f"--num-gpus {n} but {visible} GPU(s) are visible on this machine; lower --num-gpus"
            + ("" if visible else " or use --distributed-backend gloo to train on CPU processes")
        )
    if args.nnodes > 1:
        if args.node_rank is None or not args.rdzv_endpoint:
            raise ConfigError(
                "--nnodes above 1 needs --node-rank and --rdzv-endpoint host:port (node 0's address)"
            )
        if not 0 <= args.node_rank < args.nnodes:
            raise ConfigError(f"--node-rank must be 0 to {args.nnodes - 1}, got {args.node_rank}")
    return backend


def launch(args, argv: list[str], module: str) -> int:
    """Run ``python -m module <argv without launcher flags>`` in ``num_gpus`` processes on this node."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    backend = check(args)
    rest = worker_args(argv)
    if args.distributed_backend is None:
        rest += ["--distributed-backend", backend]
    if args.nnodes > 1:  # static: node ranks are given, node 0 hosts the store at the endpoint
        rdzv = {"rdzv_backend": "static", "rdzv_endpoint": args.rdzv_endpoint,
                "rdzv_configs": {"rank": args.node_rank, "timeout": args.rdzv_timeout}}  # fmt: skip
    else:
        rdzv = {"rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0",
                "rdzv_configs": {"join_timeout": args.rdzv_timeout}}  # fmt: skip
    config = LaunchConfig(
        min_nodes=args.nnodes,
        max_nodes=args.nnodes,
        nproc_per_node=args.num_gpus or 1,
        # every node must name the same run: derived from the meeting point unless set
        run_id=os.environ.get("LLM_TRAINING_RUN_ID")
        or (f"llm-{args.rdzv_endpoint}" if args.nnodes > 1 else uuid.uuid4().hex[:12]),
        max_restarts=0,
        monitor_interval=0.5,
        **rdzv,
    )
    from llm_training.api.jobs import JOB_START_VARIABLE

    # the workers' summary counts start-up from here; set for the children only, then restored
    before = os.environ.get(JOB_START_VARIABLE)
    os.environ[JOB_START_VARIABLE] = before or str(time.time())
    try:
        elastic_launch(config, sys.executable)("-m", module, *rest)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise UserError(
            f"worker rank {rank} failed (exit code {failure.exitcode}); the other processes were stopped. "
            "Its error is printed above"
        ) from None
    except Exception as exc:  # the rendezvous: an endpoint that cannot be reached, a node that never came
        name = type(exc).__name__
        if (
            "Rendezvous" in name
            or "timed out" in str(exc).lower()
            or isinstance(exc, (TimeoutError, OSError))
        ):
            raise UserError(
                f"could not meet the other nodes at {args.rdzv_endpoint or 'localhost'} within "
                f"{args.rdzv_timeout:g}s ({name}); start node 0 first and check the address and port"
            ) from None
        raise
    finally:
        if before is None:
            os.environ.pop(JOB_START_VARIABLE, None)
    return 0
