"""``llm-infer``: completions for a file of prompts, streamed in batches, in input order, resumable."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from llm_training.cli.common import add_device_flag, add_format_flag, parser, run
from llm_training.data.chat_formats import Message, parse_messages
from llm_training.errors import DataError, UserError, quoted
from llm_training.limits import MAX_LINE_BYTES, MAX_NEW_TOKENS, bad_text, json_loads, read_json_file

DESCRIPTION = """\
Generate a completion for every prompt of a JSON Lines file. Each input line is {"prompt": "..."} (or
{"text": ...}, or a JSON string) or, for a chat model, {"messages": [{"role": "user", "content": "..."}]},
optionally with "id" and "max_new_tokens"; each output line is {"id", "prompt" (or "messages"),
"completion", "new_tokens"} in the input's order. Messages are rendered with the model's chat template and
its generation prompt, and the reply ends at the end of the assistant's turn. The input is read in batches, never
whole. If the output already holds some lines (an interrupted run), those prompts are skipped and a
half-written last line is replaced, so running the same command again finishes the job. Which job wrote
the output (model, input, settings) is recorded beside it in OUTPUT.job.json: an output of another job is
never appended to."""


def build_parser():
    p = parser("llm-infer", DESCRIPTION)
    p.add_argument(
        "--model",
        required=True,
        help="Checkpoint (.pt) or export (ONNX, TorchScript, safetensors, Hugging Face folder, GGUF).",
    )
    p.add_argument("--input", required=True, help="JSON Lines file of prompts.")
    p.add_argument(
        "--output", required=True, help="JSON Lines file of completions (appended to when resuming)."
    )
    p.add_argument("--batch-size", type=int, default=32, help="Prompts generated together.")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help=f"New tokens per prompt (unless the line says); at most {MAX_NEW_TOKENS:,}.",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; higher samples more freely.")
    p.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely tokens (0: all).")
    p.add_argument("--top-p", type=float, default=1.0, help="Sample within this probability mass (1: all).")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="Above 1 discourages repeats.")
    p.add_argument("--stop", action="append", default=[], help="A text that ends a completion (repeatable).")
    p.add_argument("--seed", type=int, default=0, help="Random seed of sampling.")
    p.add_argument(
        "--no-truncate",
        action="store_true",
        help="Fail on a prompt longer than the context instead of cutting it.",
    )
    p.add_argument("--compile", action="store_true",
                   help="On CUDA: compile the decoding step with torch.compile (faster for many prompts; about "
                   "10 s more at the start).")  # fmt: skip
    add_device_flag(p)
    add_format_flag(p)
    return p


def _prompt(record, where: str) -> tuple[str | list[Message], dict]:
    """The prompt of a line: its text, or its messages (a conversation for a chat model's reply)."""
    if isinstance(record, str):
        record = {"prompt": record}
    if isinstance(record, dict):
        text = record.get("prompt", record.get("text"))
        if text is not None and not isinstance(text, str):  # a list here is not a conversation
            name = "prompt" if "prompt" in record else "text"
            raise DataError(f"{where}: '{name}' is {type(text).__name__}, not a string")
        if "messages" in record and text is None:
            text = parse_messages(record["messages"], where)
        if text is not None:
            limit = record.get("max_new_tokens")
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
                raise DataError(
                    f"{where}: 'max_new_tokens' must be a whole number of 0 or more, got {quoted(limit)}"
                )
            if limit is not None and limit > MAX_NEW_TOKENS:
                raise DataError(f"{where}: 'max_new_tokens' {limit:,} is more than llm-infer generates for one "
                                f"prompt ({MAX_NEW_TOKENS:,}); lower it")  # fmt: skip
            why = (bad_text(text) if isinstance(text, str) else None) or bad_text(record.get("id"))
            if why is not None:
                raise DataError(f"{where}: holds {why}; fix or drop this line")
            return text, record
    raise DataError(f'{where}: expected {{"prompt": "..."}}, {{"messages": [...]}} or a JSON string')


def read_prompts(path: Path, skip: int, digest=None):
    """(line number, prompt, record) from ``path`` after the first ``skip`` prompts, lazily; every byte read
    also goes to ``digest`` (a hashlib object) if given."""
    with open(path, "rb") as handle:
        seen = 0
        for number, raw in enumerate(_lines(handle, path), 1):
            if digest is not None:
                digest.update(raw)
            if not raw.strip():
                continue
            seen += 1
            if seen <= skip:
                continue
            try:
                record = json_loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {number}: not UTF-8 text; save the file as UTF-8") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
            text, record = _prompt(record, f"{path}: line {number}")
            yield number, text, record


def completed_lines(path: Path) -> int:
    """Complete JSON lines already in ``path``; a torn last line (a crash mid-write) is cut off."""
    if not path.is_file():
        return 0
    count, keep = 0, 0
    with open(path, "rb") as handle:  # streamed: the output may be large
        for line in handle:
            if not line.endswith(b"\n"):
                break
            keep += len(line)
            count += bool(line.strip())
    if keep < path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    return count


def job_record(args, input_digest: str) -> dict:
    """What makes a job's output: the model (its files' sizes and times), the input's bytes (their SHA-256),
    the settings."""
    model = Path(args.model)
    files = [model] if model.is_file() else sorted(p for p in model.rglob("*") if p.is_file())
    stats = [(str(p.relative_to(model)) if p != model else p.name, p.stat().st_size, p.stat().st_mtime_ns)
             for p in files]  # fmt: skip
    settings = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                              "repetition_penalty", "stop", "seed", "no_truncate")}  # fmt: skip
    if args.temperature > 0:  # sampling is seeded per batch: the batch size changes the text
        settings["batch_size"] = args.batch_size
    parts = {"model": [os.path.abspath(model), stats], "input": input_digest, "settings": settings}
    return json.loads(json.dumps({"written_by": "llm-infer", **parts}))  # as read back: lists, not tuples


def job_path(target: Path) -> Path:
    return target.with_name(target.name + ".job.json")


def check_job(target: Path, record: dict) -> bool:
    """An output that holds anything must have been written by this same job, and its record file may only
    be one of llm-infer's. Returns whether the record file is there already (else this job makes it)."""
    record_file = job_path(target)
    try:
        previous = None if record_file.is_symlink() else read_json_file(record_file)
    except (OSError, ValueError):
        previous = None
    there = record_file.exists() or record_file.is_symlink()
    if there and not (isinstance(previous, dict) and previous.get("written_by") == "llm-infer"):
        raise UserError(f"{record_file}: exists and is not a job record of llm-infer, which would write it "
                        "beside --output; choose another --output, or move that file away")  # fmt: skip
    if not target.is_file() or target.stat().st_size == 0:
        return there
    if not isinstance(previous, dict):
        why = f"no record of the job that wrote it ({job_path(target).name})"
    else:
        differ = [k for k in ("model", "input", "settings") if previous.get(k) != record[k]]
        if not differ:
            return there
        why = f"another job wrote it (different {' and '.join(differ)})"
    raise UserError(f"--output {target}: already holds completions and {why}; write to another --output, "
                    "or delete it to start again")  # fmt: skip


def _lines(handle, path: Path):
    """The file's lines; one longer than MAX_LINE_BYTES is an error naming it, without being held."""
    for number, line in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), 1):
        if len(line) > MAX_LINE_BYTES:
            raise DataError(f"{path}: line {number}: longer than the {MAX_LINE_BYTES:,} bytes a prompt line "
                            "may hold; shorten the prompt (only its end fits the context anyway)")  # fmt: skip
        yield line


def scan_prompts(path: Path) -> tuple[int, str, int | None]:
    """How many prompts ``path`` holds, each read and checked (a bad line fails here, before the model is
    loaded), the SHA-256 of its bytes, and the number of its first ``messages`` line (None: none), in one
    pass."""
    import hashlib

    digest = hashlib.sha256()
    count, first_chat = 0, None
    for number, prompt, _ in read_prompts(path, 0, digest):
        count += 1
        if first_chat is None and not isinstance(prompt, str):
            first_chat = number
    return count, digest.hexdigest(), first_chat


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from llm_training.data.chat_reply import HOW_TO_GET_ONE, ChatPrompts
        from llm_training.export.runtime import load_for_generation
        from llm_training.fileio import HANDLED, check_output_file, storage_error, write_json
        from llm_training.model.generate import Sampling, completion_text, generate_tokens, stop_text_check
        from llm_training.monitor.console import CountProgress

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        source, target = Path(args.input), Path(args.output)
        if not source.is_file():
            raise DataError(f"input not found: {source}")
        check_output_file(target, "--output", [source, args.model])
        if args.batch_size < 1 or not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
            raise UserError(f"--batch-size must be at least 1 and --max-new-tokens 0 to {MAX_NEW_TOKENS:,}")
        if not -(2**62) <= args.seed < 2**62:  # torch takes 64-bit seeds; each batch adds its position
            raise UserError(f"--seed must be within ±2**62, got {args.seed}")
        try:  # bad sampling flags fail before the model is loaded
            Sampling(
                args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty
            ).check()
        except ValueError as exc:
            raise UserError(f"{exc} (--temperature, --top-k, --top-p, --repetition-penalty)") from None
        total, input_digest, first_chat = scan_prompts(source)
        if total == 0:
            raise DataError(f"{source}: empty input (no prompts)")
        record = job_record(args, input_digest)
        had_record = check_job(target, record)  # before anything in the output is touched
        done = completed_lines(target)
        if done > total:
            raise UserError(
                f"{target} has {done} lines but {source} only {total} prompts: a different input?"
            )
        if done == total:  # finished earlier: the model need not be loaded
            print(f"wrote 0 completions to {target} ({done} were already there)")
            return 0
        trained = load_for_generation(args.model, args.device, args.model_format)
        if trained.chat_template is None and first_chat is not None:
            raise DataError(f"{source}: line {first_chat}: a messages line needs a chat template and the model "
                            f"{args.model} has none; {HOW_TO_GET_ONE} in a prompt line")  # fmt: skip
        # the template's prompts only where a line is a conversation (their set-up encodes a probe)
        chat = None if first_chat is None else ChatPrompts(trained.tokenizer, trained.chat_template)
        tok = trained.tokenizer
        context = trained.cfg.max_seq_length
        stops = [s for s in args.stop if s]

        stop_check = stop_text_check(tok, stops)

        fresh = not os.path.lexists(target)  # this job makes the file: on a failure it may remove it
        write_json(job_path(target), record)
        progress = CountProgress(total, done, unit="prompt", desc="infer")
        batch: list = []
        index = done
        good = target.stat().st_size if target.exists() else 0  # bytes of whole batches written
        out = open(target, "a", encoding="utf-8")  # noqa: SIM115 - closed below, also on errors
        try:

            def flush() -> None:
                nonlocal index, good
                groups: dict[tuple[int, bool], list] = {}  # by new tokens, and chat or not (its stops)
                for number, text, record in batch:
                    messages = not isinstance(text, str)
                    where = f"{source}: line {number}"
                    ids = chat.ids(text, where) if messages else tok.encode(text)
                    if args.no_truncate and len(ids) >= context:  # a prompt keeps at most context - 1 tokens
                        raise DataError(f"{where}: prompt of {len(ids)} tokens does not fit the context of "
                                        f"{context} (drop --no-truncate to keep its end)")  # fmt: skip
                    limit = record.get("max_new_tokens")  # absent or null: the flag's
                    key = (args.max_new_tokens if limit is None else limit, messages)
                    groups.setdefault(key, []).append((number, text, ids))
                results = {}
                for (max_new, messages), items in groups.items():
                    # seeded by the batch's first position: resumed at a batch boundary (where an interrupted
                    # job stops unless killed mid-batch) with the same --batch-size, it samples as before
                    sampling = Sampling(max_new, args.temperature, args.top_k, args.top_p,
                                        args.repetition_penalty, args.seed + index)  # fmt: skip
                    new = generate_tokens(trained.module, [ids for _, _, ids in items], sampling, eos_id=tok.eot_id,
                                          stop_ids=chat.stop_ids if messages else (), stop_check=stop_check,
                                          compile=args.compile)  # fmt: skip
                    for (number, _, _), ids in zip(items, new, strict=True):
                        results[number] = {
                            "completion": completion_text(tok, ids, stops),
                            "new_tokens": len(ids),
                        }
                for position, (number, text, record) in enumerate(batch):  # input order; ids default to it
                    asked = (
                        {"messages": record["messages"]} if not isinstance(text, str) else {"prompt": text}
                    )
                    row = {"id": record.get("id", index + position), **asked, **results[number]}
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
                good = os.fstat(out.fileno()).st_size
                index += len(batch)
                progress.update(len(batch))
                batch.clear()

            for item in read_prompts(source, done):
                batch.append(item)
                if len(batch) == args.batch_size:
                    flush()
            if batch:
                flush()
        except BaseException as exc:
            # nothing half-written: the output keeps whole batches only, and a new one that got none goes
            with contextlib.suppress(OSError):  # a full disk refuses the buffered rest too
                out.close()
            if fresh and good == 0:  # both made by this job: nothing of anyone else's is removed
                target.unlink(missing_ok=True)
                if not had_record:
                    job_path(target).unlink(missing_ok=True)
            else:
                os.truncate(target, good)
            if isinstance(exc, OSError) and exc.errno in HANDLED:
                raise storage_error(exc, target) from None
            raise
        finally:
            progress.close()
        out.close()
        print(
            f"wrote {total - done} completions to {target}"
            + (f" ({done} were already there)" if done else "")
        )
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
