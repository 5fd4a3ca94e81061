"""``llm-serve``: a checkpoint or an export behind an HTTP API (``/predict``, OpenAI-compatible
``/v1/completions``, ``/v1/models``, ``/health``, ``/metrics``)."""

from __future__ import annotations

import os
import sys

from llm_training.cli.common import add_device_flag, add_format_flag, parser, run

DESCRIPTION = """\
Serve a model over HTTP on loopback by default (--host 0.0.0.0 to listen on every interface).

  POST /predict         {"prompt": "..." | [...], "max_new_tokens": 64, "temperature": 0, "top_k", "top_p",
                         "repetition_penalty", "stop", "seed"} -> {"predictions": [{"prompt", "completion",
                         "new_tokens", "finish_reason"}], "model", "latency_ms"}
  POST /v1/completions  OpenAI's completions API (model, prompt, max_tokens, temperature, top_p, n, stop,
                         seed, stream with server-sent events)
  GET  /v1/models, /health, /metrics (Prometheus)

API keys: --api-key-file PATH (one key a line; or LLM_SERVE_API_KEY_FILE=PATH) or LLM_SERVE_API_KEYS=key1,key2
(or --api-key KEY, which
any user can read in the process list); clients send Authorization: Bearer KEY. --protect-all asks for the
key on /health and /metrics too. Slow clients are closed: --header-timeout, --body-timeout (408),
--keep-alive-timeout. Concurrent requests are generated in batches (--max-batch-size, --batch-wait-ms; --no-batching for one
at a time). SIGTERM or Ctrl-C finish the requests in flight before the server exits."""


def build_parser():
    p = parser("llm-serve", DESCRIPTION)
    p.add_argument(
        "--model", "--model-path", dest="model", help="Checkpoint or export (ONNX, Hugging Face folder, ...)."
    )
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    p.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    p.add_argument("--workers", type=int, default=1, help="Worker processes (each loads the model).")
    add_device_flag(p)
    add_format_flag(p)
    p.add_argument("--api-key", action="append", default=[],
                   help="Accepted API key (repeatable; visible in the process list: prefer --api-key-file).")  # fmt: skip
    p.add_argument("--api-key-file",
                   help="File of accepted API keys, one a line ('#' starts a comment); default: the file named "
                   "by LLM_SERVE_API_KEY_FILE.")  # fmt: skip
    p.add_argument("--protect-all", action="store_true", help="/health and /metrics need an API key too.")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="Seconds a client has to send a request's line and headers (then closed).")  # fmt: skip
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="Seconds a client has to send a request's body (408, then closed).")  # fmt: skip
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="Seconds an idle connection stays open between requests.")  # fmt: skip
    p.add_argument("--max-batch-size", type=int, default=32, help="Requests generated together at most.")
    p.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="How long a batch waits for more requests."
    )
    p.add_argument("--no-batching", action="store_true", help="Generate one request at a time.")
    p.add_argument("--max-pending", type=int, default=256, help="Requests waiting or running; more get 429.")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="Largest max_tokens a request may ask.")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="Largest request body (413 above).")
    p.add_argument("--timeout", type=float, default=120.0, help="Seconds a request may take (503 after).")
    p.add_argument("--truncate", action="store_true", help="Cut long prompts from the left instead of a 400.")
    p.add_argument("--compile", action="store_true",
                   help="On CUDA: compile the decoding step with torch.compile (faster tokens, about 10 s more "
                   "on the first request and on each new batch shape).")  # fmt: skip
    p.add_argument(
        "--from-env", action="store_true", help="Read the options from LLM_SERVE_OPTIONS (ModelServer)."
    )
    return p


def read_key_file(path: str) -> list[str]:
    from llm_training.errors import UserError

    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
            if handle.read(1):
                raise UserError(f"--api-key-file {path}: over 1 MiB, not a file of keys (one key a line)")
        lines = data.decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--api-key-file {path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise UserError(f"--api-key-file {path}: no key in it (one key a line)")
    return keys


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        import logging

        from llm_training.api.serve import serve
        from llm_training.errors import UserError
        from llm_training.serve.app import ServeOptions

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        if args.from_env:
            options = ServeOptions.from_env()
        else:
            if not args.model:
                raise UserError("--model is required (a checkpoint or an exported model)")
            given = args.api_key + os.environ.get("LLM_SERVE_API_KEYS", "").split(",")
            key_file = args.api_key_file or os.environ.get("LLM_SERVE_API_KEY_FILE")
            if key_file:
                given += read_key_file(key_file)
            keys = [k.strip() for k in given if k.strip()]  # "a, b" is a and b; empty entries are none
            if args.protect_all and not keys:
                raise UserError("--protect-all needs an API key (--api-key-file or LLM_SERVE_API_KEYS)")
            options = ServeOptions(model_path=args.model, device=args.device, api_keys=keys,
                                   max_batch_size=args.max_batch_size, batch_wait=args.batch_wait_ms / 1000,
                                   batching=not args.no_batching, max_pending=args.max_pending,
                                   max_tokens_limit=args.max_tokens_limit, max_request_bytes=args.max_request_bytes,
                                   timeout=args.timeout, truncate=args.truncate, compile=args.compile,
                                   model_format=args.model_format,
                                   protect_all=args.protect_all, header_timeout=args.header_timeout,
                                   body_timeout=args.body_timeout, keep_alive_timeout=args.keep_alive_timeout)  # fmt: skip
            if min(args.header_timeout, args.body_timeout, args.keep_alive_timeout) <= 0:
                raise UserError("--header-timeout, --body-timeout and --keep-alive-timeout must be positive")
        if args.workers < 1 or options.max_batch_size < 1:
            raise UserError("--workers and --max-batch-size must be at least 1")
        print(
            f"serving {options.model_path} on http://{args.host}:{args.port} ({args.workers} worker(s))",
            flush=True,
        )
        serve(options, args.host, args.port, args.workers)
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
