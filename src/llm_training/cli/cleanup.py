"""``llm-cleanup``: remove old step checkpoints, keeping the newest, the best and always the newest valid one."""

from __future__ import annotations

import sys
from pathlib import Path

from llm_training.cli.common import parser, run
from llm_training.errors import UserError

DESCRIPTION = """\
Remove model_step_N.pt checkpoints (and their .json checksum files) from a checkpoint folder, keeping the
--keep-last newest, the --keep-best with the lowest validation loss (recorded when a validation ran at that
step), and always the newest checkpoint that passes its checksum. model_best.pt, model_final.pt and any
other file are never touched. Half-written temporaries of crashed saves are removed too. Prints each file
with what happens to it and why; --dry-run only prints."""


def build_parser():
    p = parser("llm-cleanup", DESCRIPTION)
    p.add_argument("--checkpoint-dir", default="checkpoints", help="Folder of checkpoints to clean.")
    p.add_argument("--keep-last", type=int, default=0, help="Keep this many of the newest step checkpoints.")
    p.add_argument(
        "--keep-best",
        type=int,
        default=0,
        help="Keep this many step checkpoints with the lowest validation loss.",
    )
    p.add_argument("--dry-run", action="store_true", help="Show what would be removed; remove nothing.")
    return p


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from llm_training.train.retention import apply_cleanup, plan_cleanup

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        folder = Path(args.checkpoint_dir)
        if not folder.is_dir():
            raise UserError(f"--checkpoint-dir {folder}: no such folder")
        if args.keep_last < 0 or args.keep_best < 0:
            raise UserError("--keep-last and --keep-best cannot be negative")
        plan = plan_cleanup(folder, args.keep_last, args.keep_best)
        if not plan.keep and not plan.remove and not plan.stale:
            print(f"{folder}: no step checkpoints (model_step_N.pt) to clean")
            return 0
        for entry in plan.keep:
            print(f"keep    {entry.path.name}  ({plan.reasons[entry.path]})")
        verb = "would remove" if args.dry_run else "remove"
        for entry in plan.remove:
            print(f"{verb:<7} {entry.path.name}  ({_size(entry.path.stat().st_size)})")
        for path in plan.stale:
            print(f"{verb:<7} {path.name}  (half-written by a process that ended)")
        freed = plan.freed_bytes
        if not args.dry_run:
            apply_cleanup(plan)
        count = len(plan.remove) + len(plan.stale)
        done = "would free" if args.dry_run else "freed"
        print(
            f"{len(plan.keep)} kept, {count} {'to remove' if args.dry_run else 'removed'}; {done} {_size(freed)}"
        )
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
