"""``llm-monitor-gpu``: utilisation, memory, temperature and power of every GPU, every ``--interval`` seconds."""

from __future__ import annotations

import json
import sys
import time

from llm_training.cli.common import parser, run


def build_parser():
    p = parser("llm-monitor-gpu", "Print each NVIDIA GPU's utilisation, memory, temperature and power until "
                                  "Ctrl-C (or --count readings). Without a GPU: one line saying so, exit 0.")  # fmt: skip
    p.add_argument("--interval", type=float, default=1.0, help="Seconds between readings.")
    p.add_argument("--count", type=int, default=0, help="Stop after this many readings (0: until Ctrl-C).")
    p.add_argument("--json", action="store_true", help="One JSON object a GPU a reading (for scripts).")
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from llm_training.errors import UserError
        from llm_training.monitor.gpu import NoGPU, read_gpus

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        if args.interval <= 0:
            raise UserError("--interval must be positive")
        taken = 0
        while True:
            try:
                readings = read_gpus()
            except NoGPU as exc:
                print(f"no NVIDIA GPU to monitor: {exc}")
                return 0
            stamp = time.strftime("%H:%M:%S")
            for g in readings:
                if args.json:
                    print(json.dumps({"time": stamp, **g.__dict__}), flush=True)
                    continue
                power = f"{g.power_w:6.1f}/{g.power_limit_w:.0f} W" if g.power_w is not None else "power n/a"
                print(f"{stamp} gpu{g.index} {g.name:<24} util {g.utilization:5.1f}%  mem {g.memory_used_gb:6.2f}/"
                      f"{g.memory_total_gb:.1f} GB  {g.temperature_c:3.0f} C  {power}", flush=True)  # fmt: skip
            taken += 1
            if args.count and taken >= args.count:
                return 0
            time.sleep(args.interval)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
