"""The model server, for real: ``ModelServer`` in a child process on loopback, driven by ``httpx`` and by the
official ``openai`` client; every error status; batching; graceful shutdown."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import free_port, served_here, train_on_plays, wait_for_health, wait_until

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small trained model (context 64), exported to ONNX with past keys and values."""
    from llm_training.export.exporter import ExportOptions, export_checkpoint

    root = tmp_path_factory.mktemp("serve")
    checkpoint, _, _ = train_on_plays(root, 60)
    onnx = export_checkpoint(checkpoint, ExportOptions(format="onnx", output=root / "model.onnx")).export_path
    return checkpoint, onnx


@pytest.fixture(scope="module")
def server(model):
    from llm_training import ModelServer

    _, onnx = model
    srv = ModelServer(model_path=str(onnx), port=free_port(), workers=1, api_keys=[KEY], max_tokens_limit=200,
                      max_request_bytes=4096, max_pending=64).start(block=False)  # fmt: skip
    yield srv
    assert srv.stop() == 0


def greedy(checkpoint, prompts, n):
    from llm_training.model.generate import Sampling, generate_tokens
    from llm_training.train.artifacts import load_trained

    trained = load_trained(checkpoint)
    tok = trained.tokenizer
    new = generate_tokens(trained.model, [tok.encode(p) for p in prompts], Sampling(n, 0), eos_id=tok.eot_id)
    return [tok.decode(x) for x in new]


def test_predict_and_completions_give_the_models_greedy_text(server, model):
    checkpoint, _ = model
    prompts = ["ROMEO:\n", "To be, or not to be"]
    expected = greedy(checkpoint, prompts, 12)
    r = httpx.post(
        server.url + "/predict", json={"prompt": prompts, "max_new_tokens": 12}, headers=AUTH, timeout=60
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["completion"] for p in body["predictions"]] == expected and body["model"] == "model.onnx"
    assert all(p["new_tokens"] <= 12 for p in body["predictions"]) and body["latency_ms"] > 0
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "model.onnx", "prompt": prompts[0], "max_tokens": 12, "temperature": 0})  # fmt: skip
    choice = r.json()["choices"][0]
    assert choice["text"] == expected[0] and r.json()["usage"]["completion_tokens"] <= 12
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["format"] == "onnx"


def test_the_official_openai_client_with_streaming(server, model):
    openai = pytest.importorskip("openai")
    checkpoint, _ = model
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["model.onnx"]
    done = client.completions.create(model="model.onnx", prompt="KING:\n", max_tokens=15, temperature=0)
    expected = greedy(checkpoint, ["KING:\n"], 15)[0]
    assert done.choices[0].text == expected and done.choices[0].finish_reason in ("length", "stop")
    pieces, reasons = [], []
    for chunk in client.completions.create(model="model.onnx", prompt="KING:\n", max_tokens=15, temperature=0,
                                           stream=True):  # fmt: skip
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1  # streamed in several pieces
    assert reasons[-1] in ("length", "stop") and set(reasons[:-1]) == {None}
    two = client.completions.create(model="model.onnx", prompt=["A", "B"], max_tokens=4, temperature=0, n=2)
    assert len(two.choices) == 4 and two.choices[0].text == two.choices[1].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").completions.create(
            model="model.onnx", prompt="x"
        )


def test_every_error_status_is_json_without_a_traceback(server):
    url = server.url

    def chunked():  # no Content-Length: the limit counts the bytes as they come
        yield from (b"x" * 1000 for _ in range(1000))

    streamed = httpx.post(
        url + "/predict", content=chunked(), headers={**AUTH, "content-type": "application/json"}
    )
    cases = [
        (httpx.post(url + "/predict", json={"prompt": "x"}), 401, "API key"),
        (httpx.post(url + "/predict", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}), 401, "API key"),
        (httpx.post(url + "/predict", json={"prompt": "x"}, headers={"Authorization": "Bearer k\xe9y".encode("latin-1")}),
         401, "API key"),  # not ASCII: still a 401, not a 500
        (httpx.post(url + "/predict", content=b"{not json", headers={**AUTH, "content-type": "application/json"}), 422,
         "not valid JSON"),
        (httpx.post(url + "/predict", json={"prompt": 3}, headers=AUTH), 422, "prompt"),
        (httpx.post(url + "/predict", json={"prompt": "x", "temperature": -1}, headers=AUTH), 422, "temperature"),
        (httpx.post(url + "/predict", json={"prompt": "x", "file": "/etc/passwd"}, headers=AUTH), 422, "file"),
        (httpx.post(url + "/predict", json={"prompt": "word " * 1000}, headers=AUTH), 413, "4096 bytes"),
        (streamed, 413, "4096 bytes"),
        (httpx.post(url + "/predict", json={"prompt": "x", "seed": 2**63}, headers=AUTH), 422, "seed"),
        (httpx.post(url + "/predict", json={"prompt": "x", "repetition_penalty": 1e308}, headers=AUTH), 422, "penalty"),
        (httpx.post(url + "/v1/completions", json={"prompt": ["x"] * 5, "n": 16}, headers=AUTH), 400, "limit of 64"),
        (httpx.get(url + "/nowhere", headers=AUTH), 404, "Not Found"),
        (httpx.get(url + "/docs", headers=AUTH), 404, "Not Found"),
        (httpx.get(url + "/predict", headers=AUTH), 405, "Method Not Allowed"),
        (httpx.post(url + "/predict", json={"prompt": "word " * 100}, headers=AUTH), 400, "exceeds the context"),
        (httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 500}, headers=AUTH), 400, "limit of 200"),
        (httpx.post(url + "/v1/completions", json={"prompt": "x", "model": "../other"}, headers=AUTH), 404, "not served"),
        (httpx.post(url + "/v1/completions", json={"prompt": "x", "logprobs": 2}, headers=AUTH), 400, "not supported"),
    ]  # fmt: skip
    for response, status, needle in cases:
        assert response.status_code == status, (status, response.text)
        message = response.json()["error"]["message"]
        assert needle in message and "Traceback" not in response.text, (needle, message)
    assert cases[0][0].headers["www-authenticate"] == "Bearer"
    assert streamed.request.headers["transfer-encoding"] == "chunked"
    metrics = httpx.get(url + "/metrics").text
    assert 'llm_requests_total{path="/predict",status="401"} 3.0' in metrics
    assert 'llm_requests_total{path="/predict",status="413"} 2.0' in metrics
    assert 'llm_errors_total{path="/v1/completions",status="404"} 1.0' in metrics
    assert "llm_request_latency_seconds_bucket" in metrics and "llm_generated_tokens_total" in metrics


def test_concurrent_requests_are_batched(server):
    def ask(i):
        return httpx.post(server.url + "/predict", json={"prompt": f"Scene {i}:", "max_new_tokens": 20}, headers=AUTH,
                          timeout=600)  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(32)))
    assert all(a.status_code == 200 for a in answers)
    metrics = httpx.get(server.url + "/metrics").text
    sizes = {line.split("le=")[1].split("}")[0].strip('"'): float(line.rsplit(" ", 1)[1])
             for line in metrics.splitlines() if line.startswith("llm_batch_size_bucket")}  # fmt: skip
    count = float(
        next(x for x in metrics.splitlines() if x.startswith("llm_batch_size_count")).rsplit(" ", 1)[1]
    )
    assert count < 32 and sizes["1.0"] < count  # fewer batches than requests: most held several


def test_overload_api_keys_and_graceful_shutdown_through_the_cli(model):
    """Through the command line (--host, --api-key and LLM_SERVE_API_KEYS with spaces): 429 past max_pending;
    SIGTERM with a non-streaming and a streaming request in flight: both finish whole, new connections are
    refused, exit 0."""
    _, onnx = model
    port = free_port()
    env = {**os.environ, "LLM_SERVE_API_KEYS": " k2 , ,k3"}
    proc = subprocess.Popen([sys.executable, "-m", "llm_training.cli.serve", "--model", str(onnx), "--host", "127.0.0.1",
                             "--port", str(port), "--api-key", "k1", "--max-pending", "2", "--no-batching",
                             "--timeout", "600", "--truncate", "--max-tokens-limit", "4000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _overload_and_shutdown(proc, url)
    finally:
        if proc.poll() is None:  # never left running after a failure
            proc.kill()


def _overload_and_shutdown(proc, url: str) -> None:
    wait_for_health(url)
    keys = [httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {k}"}).status_code for k in
            ("k1", "k2", "k3", "nope")]  # fmt: skip
    assert keys == [200, 200, 200, 401]
    auth = {"Authorization": "Bearer k2"}
    long = {"prompt": "A", "max_new_tokens": 4000}  # greedy; long enough to still run when the third comes
    expected = httpx.post(url + "/predict", json=long, headers=auth, timeout=600).json()["predictions"][0]

    def stream():
        body = {"prompt": "A", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=600) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        return r.status_code, "".join(e["choices"][0]["text"] for e in events)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        whole = pool.submit(httpx.post, url + "/predict", json=long, headers=auth, timeout=600)
        streamed = pool.submit(stream)  # one of them waits behind the other (--no-batching)
        wait_until(lambda: pending(url) == 2, "both requests admitted")
        busy = httpx.post(url + "/predict", json=long, headers=auth, timeout=600)
        assert busy.status_code == 429 and "retry later" in busy.json()["error"]["message"]  # both in flight
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:  # a connection caught in the closing is reset
            try:
                httpx.get(url + "/health", timeout=5)
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                return True
            return False

        # the port closes, and the requests in flight go on to their end
        wait_until(refused, "the port closing after SIGTERM", every=0.05)
        assert whole.result().status_code == 200 and whole.result().json()["predictions"][0] == expected
        assert streamed.result() == (200, expected["completion"])
    assert proc.wait(60) == 0
    assert "Traceback" not in proc.stderr.read()


def pending(url: str) -> int:
    return httpx.get(url + "/health", timeout=60).json()["pending"]


def test_requests_past_the_timeout_stop_generating(model):
    """503 (an error event when streamed) past the timeout, and the rows that timed out stop generating."""
    from llm_training.serve.app import ServeOptions

    _, onnx = model
    options = ServeOptions(
        model_path=str(onnx), timeout=1, batching=False, truncate=True, max_tokens_limit=100000
    )
    with served_here(options) as url:

        def generated() -> float:
            text = httpx.get(url + "/metrics").text
            return float(re.search(r"^llm_generated_tokens_total (\S+)$", text, re.M).group(1))

        # a row that timed out stops generating: once nothing is pending, it has made far fewer than 100,000
        slow = httpx.post(url + "/predict", json={"prompt": "A", "max_new_tokens": 100000}, timeout=60)
        assert slow.status_code == 503 and "timeout" in slow.json()["error"]["message"]
        wait_until(lambda: pending(url) == 0, "the timed-out row stopping")
        assert generated() < 100000
        body = {"prompt": "A", "max_tokens": 100000, "temperature": 0, "stream": True}
        slow = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert slow.status_code == 200 and '"code": "timeout"' in slow.text
        wait_until(lambda: pending(url) == 0, "the timed-out stream's row stopping")
        assert generated() < 100000


def test_the_engine_admits_a_request_whole_and_cancels_a_running_row(model):
    """All of a request's rows or none (no rows left generating behind a 429); cancel ends a running row."""
    from llm_training.serve.app import ServeOptions, make_engine
    from llm_training.serve.engine import Overloaded, Request

    _, onnx = model
    engine = make_engine(ServeOptions(model_path=str(onnx), max_pending=3, batching=False, truncate=True))
    engine.load()
    try:
        long = engine.submit(Request("A", 100000, temperature=0))
        with pytest.raises(Overloaded, match="adds 3"):
            engine.submit_many([Request("B", 4)] * 3)
        assert engine.pending == 1
        wait_until(long.future.running, "the long row starting")
        engine.cancel(long)
        assert long.future.result(timeout=300).completion_tokens < 100000
    finally:
        engine.close()


def test_a_failing_generation_is_a_counted_500_without_its_detail(model):
    """A model that fails (a test wrapper raising in forward), served through the Python API: 500 JSON
    without the exception's text, counted in /metrics; a stream ends with a generic error event."""
    from llm_training.serve.app import ServeOptions, make_engine

    _, onnx = model
    options = ServeOptions(model_path=str(onnx))
    engine = make_engine(options)
    engine.load()

    def broken(*_args, **_kwargs):
        raise RuntimeError("secret detail")

    engine.loaded.module.forward = broken
    with served_here(options, engine) as url:
        r = httpx.post(url + "/predict", json={"prompt": "x", "max_new_tokens": 4}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error (see the server log)"
        r = httpx.post(
            url + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True}, timeout=60
        )
        assert r.status_code == 200 and '"message": "internal error (see the server log)"' in r.text
        assert "secret" not in r.text
        assert 'llm_errors_total{path="/predict",status="500"} 1.0' in httpx.get(url + "/metrics").text


def test_bad_model_path_fails_the_start(tmp_path):
    from llm_training import ModelServer, UserError

    with pytest.raises(UserError, match="server stopped while starting: error: checkpoint not found"):
        ModelServer(model_path=str(tmp_path / "none.onnx"), port=free_port()).start(block=False, wait=60)
    # several workers: checked in the parent before they start, one line and exit 2 as well
    proc = subprocess.run([sys.executable, "-m", "llm_training.cli.serve", "--model", str(tmp_path / "x.pt"),
                           "--workers", "2"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: checkpoint not found: {tmp_path / 'x.pt'} (nor an exported model)"
    ]


def test_several_worker_processes(model, tmp_path):
    """``workers=2`` as the guide's ``workers=4``: uvicorn's worker processes each load the model. A worker
    that dies is replaced; when its replacement cannot start (the model file is gone), the server stops with
    an error and a non-zero exit."""
    import shutil

    psutil = pytest.importorskip("psutil")
    from llm_training import ModelServer

    _, onnx = model
    copy = shutil.copy(onnx, tmp_path / "model.onnx")
    srv = ModelServer(model_path=str(copy), port=free_port(), workers=2).start(block=False)
    try:
        texts = {httpx.post(srv.url + "/predict", json={"prompt": "ROMEO:", "max_new_tokens": 8}, timeout=60).json()[
            "predictions"][0]["completion"] for _ in range(4)}  # fmt: skip
        assert len(texts) == 1
        workers = [
            p for p in psutil.Process(srv.process.pid).children() if "spawn_main" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2
        os.remove(copy)
        workers[0].kill()
        assert srv.process.wait(120) == 1
        srv.stderr.seek(0)
        assert "error: a worker process failed to start" in srv.stderr.read()
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["checkpoint", "hf"])
def test_checkpoints_and_hugging_face_folders_are_served_too(model, tmp_path, kind):
    pytest.importorskip("transformers")
    from llm_training import ModelServer
    from llm_training.export.exporter import ExportOptions, export_checkpoint

    checkpoint, _ = model
    path = checkpoint if kind == "checkpoint" else export_checkpoint(
        checkpoint, ExportOptions(format="hf", output=tmp_path / "hf")).export_path  # fmt: skip
    srv = ModelServer(model_path=str(path), port=free_port(), device="cpu").start(block=False)
    try:
        r = httpx.post(srv.url + "/predict", json={"prompt": "ROMEO:\n", "max_new_tokens": 10}, timeout=60)
        assert r.json()["predictions"][0]["completion"] == greedy(checkpoint, ["ROMEO:\n"], 10)[0]
    finally:
        srv.stop()


def test_stop_texts_are_bounded_and_a_long_request_does_not_hold_a_short_one(model):
    """More than 4 stop texts, or one over 256 characters, is a 422 (the 80,000-text list of the issue among
    them). A long request with four long stop texts, and a short request sent while it generates: the short
    one is answered while the long one is still generating (before, it waited for the long one's end)."""
    from llm_training.serve.app import ServeOptions

    _, onnx = model
    options = ServeOptions(model_path=str(onnx), truncate=True, max_tokens_limit=100000)
    with served_here(options) as url:
        for stop in (["a"] * 5, "x" * 257, [f"stop {i}" for i in range(80_000)]):
            r = httpx.post(url + "/v1/completions", json={"prompt": "A", "stop": stop}, timeout=60)
            assert r.status_code == 422 and "at most 4 stop texts" in r.json()["error"]["message"], r.text
        stops = [chr(0x3B1 + i) * 256 for i in range(4)]  # Greek letters: never in the model's English
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, url + "/predict", timeout=300,
                               json={"prompt": "A", "max_new_tokens": 3000, "stop": stops})  # fmt: skip
            wait_until(lambda: pending(url) > 0, "the long request admitted")
            short = httpx.post(url + "/predict", json={"prompt": "B", "max_new_tokens": 4}, timeout=300)
            assert short.status_code == 200 and not long.done()  # answered while the long one generates
            assert long.result().status_code == 200
            assert long.result().json()["predictions"][0]["new_tokens"] == 3000


def test_rows_end_as_they_finish_in_a_batch(model):
    """In one batch, a row that needs 2 tokens is answered while its neighbour still generates."""
    from llm_training.serve.app import ServeOptions, make_engine
    from llm_training.serve.engine import Request

    _, onnx = model
    engine = make_engine(ServeOptions(model_path=str(onnx), truncate=True, batch_wait=0.5))
    engine.load()
    try:
        long, short = engine.submit_many([Request("A", 3000, temperature=0), Request("B", 2, temperature=0)])
        assert short.future.result(timeout=120).completion_tokens == 2
        assert not long.future.done()
        assert long.future.result(timeout=300).completion_tokens == 3000
    finally:
        engine.close()


def test_unencodable_text_in_any_field_is_a_400(server):
    """A lone surrogate in any string of any endpoint's body (escaped, raw UTF-8 bytes, a UTF-16 body, a key)
    is a 400 with a JSON error, never a 500; a proper surrogate pair is text like any other."""
    lone = "\\ud800"
    bodies = {
        "/predict": [f'{{"prompt": "{lone}"}}', f'{{"prompt": ["ok", "a{lone}b"]}}', f'{{"prompt": "x", "stop": "{lone}"}}',
                     f'{{"prompt": "x", "stop": ["y", "{lone}"]}}', f'{{"prompt": "x", "{lone}": 1}}'],
        "/v1/completions": [f'{{"prompt": "{lone}"}}', f'{{"prompt": ["{lone}"]}}', f'{{"prompt": "x", "model": "{lone}"}}',
                            f'{{"prompt": "x", "stop": ["{lone}"]}}', f'{{"prompt": "x", "user": "{lone}"}}',
                            f'{{"prompt": "x", "{lone}": 1}}', '{"prompt": "\\udc00x"}'],
    }  # fmt: skip
    cases = [(path, body.encode()) for path, texts in bodies.items() for body in texts]
    cases += [("/predict", b'{"prompt": "\xed\xa0\x80"}'),  # the surrogate's own bytes, which json accepts
              ("/v1/completions", '{"prompt": "\\ud800"}'.encode("utf-16-le")),
              ("/v1/models", f'{{"x": "{lone}"}}'.encode()), ("/health", f'{{"x": "{lone}"}}'.encode())]  # fmt: skip
    for path, content in cases:
        request = httpx.post if path.startswith(("/predict", "/v1/completions")) else httpx.get
        if request is httpx.get:
            r = httpx.request("GET", server.url + path, content=content, headers=AUTH, timeout=60)
        else:
            r = request(server.url + path, content=content, headers={**AUTH, "content-type": "application/json"},
                        timeout=60)  # fmt: skip
        assert r.status_code == 400, (path, content, r.status_code, r.text)
        assert "not valid Unicode" in r.json()["error"]["message"], (path, content)
    pair = httpx.post(server.url + "/predict", content=b'{"prompt": "\\ud83d\\ude00", "max_new_tokens": 2}',
                      headers={**AUTH, "content-type": "application/json"}, timeout=60)  # fmt: skip
    assert pair.status_code == 200 and pair.json()["predictions"][0]["prompt"] == "\U0001f600"
    assert 'llm_requests_total{path="/predict",status="500"}' not in httpx.get(server.url + "/metrics").text


def test_slow_clients_are_closed(model):
    """Slowloris: a client sending its headers a byte at a time is disconnected after --header-timeout
    (1 s here); a body that stalls gets a 408 and the connection is closed after --body-timeout."""
    import socket

    from llm_training.serve.app import ServeOptions

    _, onnx = model
    options = ServeOptions(model_path=str(onnx), header_timeout=1, body_timeout=1)
    with served_here(options) as url:
        port = int(url.rsplit(":", 1)[1])
        # headers that never end: only the server can close this connection, which is what is asserted
        request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"x" * 8000
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(0.2)  # a byte about each 0.2 s: past the 1 s timeout after a few
            closed = False
            for byte in request:
                try:
                    sock.sendall(bytes([byte]))
                    closed = sock.recv(1024) == b""
                except TimeoutError:
                    continue
                except OSError:  # reset
                    closed = True
                if closed:
                    break
            assert closed, "a client that never finished its headers was never disconnected"

        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n" + b'{"prompt": "')  # fmt: skip
            sock.settimeout(60)  # generous: a busy machine; the server answers after 1 s
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer
        # the server still serves
        assert httpx.get(url + "/health").status_code == 200


def test_protect_all_and_a_key_file_keep_the_key_out_of_every_process_list(model, tmp_path):
    """--protect-all: /health and /metrics need the key too. --api-key-file: the key is in no command line
    of the server's processes (the command, uvicorn's supervisor, its two workers)."""
    psutil = pytest.importorskip("psutil")
    _, onnx = model
    secret = "file-key-" + os.urandom(8).hex()
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# the server's keys\n{secret}\n\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LLM_SERVE_API_KEYS"}
    proc = subprocess.Popen([sys.executable, "-m", "llm_training.cli.serve", "--model", str(onnx), "--port", str(port),
                             "--api-key-file", str(keys), "--protect-all", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {secret}"}
    try:
        wait_for_health(url, headers=auth, process=proc)
        for path in ("/health", "/metrics"):
            assert httpx.get(url + path).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(url + path, headers=auth).status_code == 200
        answer = httpx.post(
            url + "/predict", json={"prompt": "A", "max_new_tokens": 2}, headers=auth, timeout=60
        )
        assert answer.status_code == 200
        processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(processes) >= 3  # the command (the supervisor) and two workers
        for process in processes:
            with open(f"/proc/{process.pid}/cmdline", "rb") as handle:
                assert secret.encode() not in handle.read()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    assert "Traceback" not in proc.stderr.read()


def test_model_servers_child_gets_the_key_by_its_environment(server):
    psutil = pytest.importorskip("psutil")
    for process in [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(True)]:
        with open(f"/proc/{process.pid}/cmdline", "rb") as handle:
            assert KEY.encode() not in handle.read()
    assert httpx.get(server.url + "/health").status_code == 200  # not protect_all: open, as by default


def test_stop_checks_decode_a_tail_window_and_find_long_stops(model):
    """The stop check after each token decodes only a window at the end of the new tokens (its size set by
    the longest stop, not by the text so far), and still finds a 200-character stop (the old 32-token window
    missed it) at the token that completes it."""
    from conftest import corpus_records
    from llm_training.export.runtime import load_for_generation
    from llm_training.model.generate import stop_text_check

    tok = load_for_generation(str(model[1]), "cpu").tokenizer
    text = corpus_records("shakespeare", 1, lambda r: r["id"].endswith("_gut"))[0]["text"][:20_000]
    ids = tok.encode(text)
    stop = tok.decode(ids)[15_000:15_200]

    class Counted:  # the real tokenizer, counting the tokens each decode reads
        sizes: list[int] = []

        def decode(self, part):
            self.sizes.append(len(part))
            return tok.decode(part)

    counted = Counted()
    check = stop_text_check(counted, [stop])
    end = next(n for n in range(1, len(ids) + 1) if check(ids[:n]))
    assert stop in tok.decode(ids[:end]) and stop not in tok.decode(ids[: end - 1])  # found when it completes
    assert stop not in tok.decode(ids[: end - check(ids[:end])])
    assert end > 3000 and max(counted.sizes) <= 4 * 200 + 4  # a window, never the text so far
