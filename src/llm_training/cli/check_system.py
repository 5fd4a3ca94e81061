"""``llm-check-system``: is this machine ready? Python, PyTorch, CUDA, GPUs, CPU, RAM, disk, packages."""

from __future__ import annotations

import json
import sys

from llm_training.cli.common import parser, run


def build_parser():
    p = parser("llm-check-system", "Report Python, PyTorch, CUDA and the driver, GPUs, CPU, RAM, disk and the "
                                   "packages; exit 1 when something required is missing.")  # fmt: skip
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")
    p.add_argument("--path", default=".", help="Where the free disk space is measured.")
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from llm_training.monitor.system import system_report

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        r = system_report(args.path)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            t = r["torch"]
            lines = [f"Python      {r['python']['version']}",
                     f"PyTorch     {t['version']}  (CUDA {t['cuda_version'] or 'none'}, available: {t['cuda_available']}, "
                     f"cuDNN {t['cudnn'] or 'none'})",
                     f"Driver      {r['driver'] or 'none'}"]  # fmt: skip
            lines += [f"GPU {g['index']}       {g['name']}, {g['memory_gb']} GB" for g in r["gpus"]] or [
                "GPU         none"
            ]
            lines += [f"CPU         {r['cpu']} ({r['cpu_count']} logical cores)", f"RAM         {r['ram_gb']} GB",
                      f"disk        {r['disk']['free_gb']} GB free of {r['disk']['total_gb']} GB at {r['disk']['path']}",
                      "packages    " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in r["required"].items()),
                      "optional    " + ", ".join(f"{k} {v or '-'}" for k, v in r["optional"].items())]  # fmt: skip
            print("\n".join(lines))
            for w in r["warnings"]:
                print(f"warning: {w}")
            for e in r["errors"]:
                print(f"error: {e}")
            print("not ready" if r["errors"] else "ready")
        return 1 if r["errors"] else 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
