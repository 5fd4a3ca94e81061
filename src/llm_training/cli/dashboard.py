"""``llm-dashboard``: the live dashboard of the runs under a folder, or (``--report``) its HTML report."""

from __future__ import annotations

import os
import sys

from llm_training.cli.common import add_root_flag, parser, run


def build_parser():
    p = parser("llm-dashboard", "Serve a web page with live charts of every training run under --root (loss, "
                                "learning rate, throughput, gradient norm, custom metrics) until Ctrl-C; with "
                                "--report, write the same charts to one offline HTML file and exit.")  # fmt: skip
    add_root_flag(p)
    p.add_argument("--port", type=int, default=8080, help="Port to listen on (0: any free port).")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    p.add_argument("--refresh", type=float, default=2.0, help="Seconds between the page's updates.")
    p.add_argument("--report", metavar="PATH", help="Write the report to PATH (.html) instead of serving.")
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from pathlib import Path

        from llm_training.errors import UserError
        from llm_training.monitor.dashboard import MetricsDashboard

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        if not Path(args.root).is_dir():
            raise UserError(f"--root {args.root}: no such folder")
        dashboard = MetricsDashboard(port=args.port, host=args.host, root=args.root, refresh=args.refresh)
        if args.report:
            data = dashboard.snapshot()
            path = dashboard.generate_report(args.report, data)
            print(f"report: {path} ({len(data['runs'])} run(s))")
            return 0
        dashboard.start()
        print(
            f"dashboard: {dashboard.url} (runs under {Path(args.root).resolve()}; Ctrl-C to stop)", flush=True
        )
        if not dashboard.wait():  # a server thread stuck in its shutdown must not keep the process alive
            print("the dashboard's server did not stop cleanly; exiting", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(0)
        return 0

    return run(body, extra="monitor")


if __name__ == "__main__":
    sys.exit(main())
