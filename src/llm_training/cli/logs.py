"""``llm-logs``: the training runs under a folder, or one run's log (and metrics), followed live."""

from __future__ import annotations

import json
import sys
import time

from llm_training.cli.common import add_root_flag, parser, run


def build_parser():
    p = parser("llm-logs", "Without --training-id: list the runs found under --root (their id, folder, status, "
                           "last step and loss). With it: print that run's log lines, and with --follow keep "
                           "printing new ones until the run ends (Ctrl-C to stop). 'latest' names the newest run.")  # fmt: skip
    p.add_argument("--training-id", help="A run id as listed (e.g. 20260101-120000), or 'latest'.")
    p.add_argument("--follow", "-f", action="store_true", help="Keep printing new lines until the run ends.")
    p.add_argument("--metrics", action="store_true", help="Print the run's metrics.jsonl records instead.")
    add_root_flag(p)
    p.add_argument("--interval", type=float, default=1.0, help="Seconds between checks with --follow.")
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from llm_training.errors import UserError
        from llm_training.monitor.runs import find_runs, run_lines

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        runs = find_runs(args.root)
        if not args.training_id:
            if not runs:
                print(f"no training runs under {args.root} (a run writes <output_dir>/logs/system.log)")
                return 0
            print(f"{'run id':<18} {'status':<19} {'step':>7} {'loss':>8}  folder")
            for r in runs:
                loss = f"{r.last_loss:.4f}" if r.last_loss is not None else "-"
                print(
                    f"{r.run_id:<18} {r.status:<19} {r.last_step if r.last_step is not None else '-':>7} {loss:>8}  {r.folder}"
                )
            return 0
        wanted = (
            runs[-1:] if args.training_id == "latest" else [r for r in runs if r.run_id == args.training_id]
        )
        if not wanted:
            known = ", ".join(r.run_id for r in runs[-5:]) or "none"
            raise UserError(
                f"no run {args.training_id!r} under {args.root} (recent: {known}); llm-logs lists them"
            )
        target = wanted[0]
        if args.metrics:
            return _metrics(target, runs, args)
        shown = 0
        while True:
            lines = run_lines(target)
            for line in lines[shown:]:
                print(line, flush=True)
            shown = len(lines)
            if not args.follow or any(" run_end " in line for line in lines):
                return 0
            time.sleep(args.interval)

    return run(body)


def _metrics(target, runs, args) -> int:
    """The records of the run's metrics.jsonl (one folder may hold several runs: only this one's)."""
    from llm_training.monitor.runs import RecordTail, records_of, run_lines

    path = target.folder / "metrics.jsonl"
    if not path.is_file():
        print(f"{path}: no metrics yet")
        return 0
    shown, tail = 0, RecordTail(path)
    while True:
        records = records_of(target, tail.read(), runs)
        for r in records[shown:]:
            print(json.dumps(r), flush=True)
        shown = len(records)
        if not args.follow or any(" run_end " in line for line in run_lines(target)[-3:]):
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
