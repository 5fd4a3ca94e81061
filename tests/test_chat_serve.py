"""Chat with a fine-tuned model: ``/v1/chat/completions`` through the official ``openai`` client (streamed and
not) against a real server on loopback, ``llm-infer``'s ``messages`` lines, and the chat template in GGUF.

The model: a small base model of Shakespeare (``conftest.train_on_plays``), chat fine-tuned with ChatML on
lines of a play, each answered with a short reply, so that it learns to end its turn with ``<|im_end|>``.
Replies are checked against our own greedy ``generate_tokens`` on the ChatML prompt built here by hand,
cut at the first ``<|im_end|>``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_user_error, call_cli, served_here, train_on_plays
from llm_training.data.chat_template import CHATML

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

ASK = [{"role": "user", "content": "What say you to this, my good lord?"}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """(base checkpoint, chat checkpoint): the chat run replies "Ay, my lord." to a question and "No, my
    lord." to anything else, which it learns in a few dozen steps."""
    from llm_training.api.trainer import Trainer

    root = tmp_path_factory.mktemp("chat")
    base, _, plays = train_on_plays(root, 30)
    lines = [x.strip() for x in plays[0]["text"][5_000:80_000].splitlines() if 20 < len(x.strip()) < 60][:240]
    data = root / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for line in lines:
            reply = "Ay, my lord." if line.endswith("?") else "No, my lord."
            messages = [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    settings = {"batch_size": 8, "num_epochs": 4, "learning_rate": 3e-3, "eval_interval": 20, "eval_batches": 2, "sample_tokens": 0,
                "resources.device": "cpu", "logging.tensorboard": False, "logging.progress_bar": False}  # fmt: skip
    result = Trainer(output_dir=str(root / "sft")).finetune(
        str(base), str(data), chat_template="chatml", max_steps=60, **settings
    )
    return base, Path(result.final_checkpoint)


def chatml_ids(tokenizer, messages: list[dict]) -> list[int]:
    """ChatML's prompt for a reply, built by hand: markup tokens by id, the text between them encoded."""
    start, end = (tokenizer.backend.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    ids = []
    for message in messages:
        ids += [
            start,
            *tokenizer.encode(f"{message['role']}\n{message['content']}"),
            end,
            *tokenizer.encode("\n"),
        ]
    return ids + [start, *tokenizer.encode("assistant\n")]


def greedy_reply(model, tokenizer, messages: list[dict], max_new: int) -> tuple[str, int, int, bool]:
    """(reply text, prompt tokens, reply tokens, whether it ended its turn) by our generate, greedy."""
    from llm_training.model.generate import Sampling, generate_tokens

    prompt = chatml_ids(tokenizer, messages)
    new = generate_tokens(model, [prompt], Sampling(max_new, 0), eos_id=tokenizer.eot_id)[0]
    end = tokenizer.backend.token_to_id("<|im_end|>")
    ended = end in new
    reply = new[: new.index(end)] if ended else new
    return tokenizer.decode(reply), len(prompt), len(reply), ended


def expected(checkpoint: Path, messages: list[dict], max_new: int):
    from llm_training.train.artifacts import load_trained

    trained = load_trained(checkpoint)
    return greedy_reply(trained.model, trained.tokenizer, messages, max_new)


def test_chat_completions_with_the_openai_client(chat_model):
    openai = pytest.importorskip("openai")
    from llm_training.serve.app import ServeOptions

    _, sft = chat_model
    text, prompt_tokens, reply_tokens, ended = expected(sft, ASK, 20)
    print(f"greedy reply: {text!r} ({reply_tokens} tokens, ended its turn: {ended})")
    assert ended and text in ("Ay, my lord.", "No, my lord.")
    with served_here(ServeOptions(model_path=str(sft), max_tokens_limit=40)) as url:
        assert httpx.get(url + "/health").json()["chat"] is True
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        done = client.chat.completions.create(model=sft.name, messages=ASK, temperature=0, max_tokens=20)
        choice = done.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == text
        assert choice.finish_reason == "stop" and "<|im_end|>" not in choice.message.content
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt_tokens, reply_tokens)
        assert done.object == "chat.completion" and done.model == sft.name

        stream = client.chat.completions.create(model=sft.name, messages=ASK, temperature=0, max_tokens=20,
                                                stream=True, stream_options={"include_usage": True})  # fmt: skip
        chunks = list(stream)
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        with_choices = [c for c in chunks if c.choices]
        assert with_choices[0].choices[0].delta.role == "assistant"
        pieces = [c.choices[0].delta.content or "" for c in with_choices]
        reasons = [c.choices[0].finish_reason for c in with_choices]
        print(f"streamed pieces: {pieces}")
        assert "".join(pieces) == text and len([p for p in pieces if p]) > 1  # in several pieces
        assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply_tokens

        # a longer conversation (system, earlier turns), OpenAI's newer names and a cut reply
        talk = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Come?"},
                {"role": "assistant", "content": "No, my lord."},
                {"role": "user", "content": [{"type": "text", "text": "Will you come?"}]}]  # fmt: skip
        as_rendered = [{"role": "system", "content": "Be brief."}, *talk[1:3],
                       {"role": "user", "content": "Will you come?"}]  # fmt: skip
        long_text, long_prompt, long_tokens, ended = expected(sft, as_rendered, 3)
        cut = client.chat.completions.create(model=sft.name, messages=talk, temperature=0,
                                             max_completion_tokens=3, n=2)  # fmt: skip
        assert [c.message.content for c in cut.choices] == [long_text] * 2
        assert (cut.usage.prompt_tokens, cut.usage.completion_tokens) == (long_prompt, 2 * long_tokens)
        assert [c.finish_reason for c in cut.choices] == ["stop" if ended else "length"] * 2


def test_chat_errors_are_json_never_500(chat_model):
    from llm_training.serve.app import ServeOptions

    base, sft = chat_model
    with served_here(ServeOptions(model_path=str(base))) as url:
        assert httpx.get(url + "/health").json()["chat"] is False
        r = httpx.post(url + "/v1/chat/completions", json={"messages": ASK}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template", r.text
        assert "llm-finetune --chat-template chatml" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/completions", json={"prompt": "KING:"}, timeout=60).status_code == 200

    cases = [
        ({"messages": [{"role": "tool", "content": "x"}]}, 422, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, 422, "messages.0.content"),
        ({"messages": [{"role": "user", "content": None}]}, 422, "messages.0.content"),
        ({"messages": []}, 422, "messages"),
        ({"messages": "hello"}, 422, "messages"),
        ({}, 422, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 300}]}, 400, "exceeds the context"),
        ({"messages": ASK, "max_tokens": 41}, 400, "over this server's limit"),
        (
            {"messages": [{"role": "user", "content": "word " * 40}], "max_tokens": 40},
            400,
            "exceeds the context",
        ),
        ({"messages": ASK, "logprobs": True}, 400, "logprobs"),
        ({"messages": ASK, "tools": [{"type": "function"}]}, 400, "tools"),
        ({"messages": ASK, "frequency_penalty": 1}, 400, "frequency_penalty"),
        ({"messages": ASK, "model": "other"}, 404, "not served here"),
        ({"messages": ASK, "temperature": -1}, 422, "temperature"),
        ({"messages": ASK, "n": 0}, 422, "n"),
    ]
    with served_here(ServeOptions(model_path=str(sft), max_tokens_limit=40)) as url:
        for body, status, needle in cases:
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == status, (body, r.text)
            assert needle in r.json()["error"]["message"], (body, r.text)
        stream = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 600}],
                                                                "stream": True}, timeout=60)  # fmt: skip
        assert stream.status_code == 400 and "exceeds the context" in stream.json()["error"]["message"]
        metrics = httpx.get(url + "/metrics").text
        assert 'status="500"' not in metrics


def test_llm_infer_answers_messages_lines(tmp_path, chat_model):
    from llm_training.cli.infer import main as infer_main
    from llm_training.train.artifacts import load_trained

    base, sft = chat_model
    talk = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Shall we go in?"}]
    source = tmp_path / "in.jsonl"
    lines = [{"prompt": "KING:\n"}, {"messages": ASK}, {"id": "x", "messages": talk, "max_new_tokens": 12}]
    source.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    args = ["--model", str(sft), "--input", str(source), "--output", str(out), "--max-new-tokens", "20",
            "--device", "cpu", "--batch-size", "2"]  # fmt: skip
    proc = call_cli(infer_main, args)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    trained = load_trained(sft)
    from llm_training.model.generate import Sampling, generate_tokens

    tok = trained.tokenizer
    plain = tok.decode(
        generate_tokens(trained.model, [tok.encode("KING:\n")], Sampling(20, 0), eos_id=tok.eot_id)[0]
    )
    assert rows[0] == {"id": 0, "prompt": "KING:\n", "completion": plain, "new_tokens": rows[0]["new_tokens"]}
    reply, _, reply_tokens, _ = greedy_reply(trained.model, tok, ASK, 20)
    assert rows[1] == {"id": 1, "messages": ASK, "completion": reply, "new_tokens": reply_tokens}
    reply, _, reply_tokens, _ = greedy_reply(trained.model, tok, talk, 12)
    assert rows[2] == {"id": "x", "messages": talk, "completion": reply, "new_tokens": reply_tokens}
    print(f"llm-infer replies: {[r['completion'] for r in rows]}")

    # resumed after its first batch: the same file
    whole = out.read_text()
    out.write_text("".join(whole.splitlines(keepends=True)[:2]))
    assert call_cli(infer_main, args).returncode == 0 and out.read_text() == whole

    # a messages line for a model without a template; a bad messages line (before the model is loaded)
    proc = call_cli(infer_main, ["--model", str(base), "--input", str(source), "--output",
                                 str(tmp_path / "base.jsonl"), "--device", "cpu"])  # fmt: skip
    assert_user_error(
        proc, f"{source}: line 2", "needs a chat template", "llm-finetune --chat-template chatml"
    )
    assert not (tmp_path / "base.jsonl").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"messages": [{"role": "robot", "content": "hi"}]}\n')
    proc = call_cli(infer_main, ["--model", str(tmp_path / "absent.pt"), "--input", str(bad), "--output",
                                 str(tmp_path / "bad_out.jsonl")])  # fmt: skip
    assert_user_error(proc, f"{bad}: line 2", "robot")
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    assert_user_error(call_cli(infer_main, ["--model", str(sft), "--input", str(bad), "--output",
                                            str(tmp_path / "bad_out.jsonl")]), f"{bad}: line 1", "content")  # fmt: skip


def test_gguf_and_hf_exports_carry_the_template(tmp_path, chat_model):
    gguf = pytest.importorskip("gguf")
    from llm_training.data.chat_reply import ChatPrompts
    from llm_training.export.exporter import ExportOptions, export_checkpoint
    from llm_training.export.gguf import read_chat_template
    from llm_training.export.runtime import load_model
    from llm_training.train.artifacts import load_trained

    base, sft = chat_model
    trained = load_trained(sft)
    tok = trained.tokenizer
    reply = greedy_reply(trained.model, tok, ASK, 20)
    path = export_checkpoint(sft, ExportOptions(format="gguf", output=tmp_path / "chat.gguf")).export_path
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.chat_template"].contents() == CHATML == read_chat_template(path)
    im_end = tok.backend.token_to_id("<|im_end|>")
    assert fields["tokenizer.ggml.eot_token_id"].contents() == im_end
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eot_id != im_end
    hf = export_checkpoint(sft, ExportOptions(format="hf", output=tmp_path / "hf")).export_path
    for exported in (path, hf):
        loaded = load_model(exported)
        assert loaded.chat_template is not None and loaded.chat_template.source == CHATML
        prompts = ChatPrompts(loaded.tokenizer, loaded.chat_template)
        assert prompts.ids(ASK) == chatml_ids(tok, ASK) and prompts.stop_ids == ((im_end,),)
        assert greedy_reply(loaded.module, loaded.tokenizer, ASK, 20) == reply, exported
    # a base model's GGUF has neither key
    plain = export_checkpoint(base, ExportOptions(format="gguf", output=tmp_path / "base.gguf")).export_path
    fields = gguf.GGUFReader(str(plain)).fields
    assert "tokenizer.chat_template" not in fields and "tokenizer.ggml.eot_token_id" not in fields
    assert load_model(plain).chat_template is None
    shutil.rmtree(tmp_path / "hf")
