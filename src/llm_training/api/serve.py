"""``ModelServer``: the usage guide's server, over the same app as ``llm-serve``."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from llm_training.errors import UserError
from llm_training.serve.app import OPTIONS_ENV, ServeOptions, create_app, make_engine


class ModelServer:
    """``ModelServer(model_path='exports/model.onnx', port=8000, workers=4).start()`` serves a checkpoint or
    an export until stopped (Ctrl-C or SIGTERM finish the requests in flight first). ``start(block=False)``
    runs it in a child process, returns once ``/health`` answers, and ``stop()`` ends it. Keyword options:
    the fields of ``ServeOptions`` (api_keys, max_batch_size, batching, timeout, ...)."""

    def __init__(
        self, model_path: str, port: int = 8000, workers: int = 1, host: str = "127.0.0.1", **options: Any
    ):
        names = {f.name for f in dataclasses.fields(ServeOptions)}
        unknown = set(options) - names
        if unknown:
            raise UserError(
                f"ModelServer: unknown option {sorted(unknown)[0]!r}; valid: {', '.join(sorted(names))}"
            )
        if workers < 1:
            raise UserError("workers must be at least 1")
        self.options = ServeOptions(model_path=str(model_path), **options)
        self.port, self.workers, self.host = port, workers, host
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, block: bool = True, wait: float = 300.0) -> ModelServer:
        """Serve until stopped (block=True, as in the guide), or in a child process that start(block=False)
        returns once /health answers."""
        if block and self.workers == 1:
            serve(self.options, self.host, self.port, self.workers)
            return self
        if block:  # worker processes: their supervisor runs in a child (see _serve_in_child)
            self._serve_in_child()
            return self
        # a file, not a pipe: a pipe nobody reads while the server runs would fill and block its logging
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115 (closed by stop())
        self.process = self._child(stderr=self.stderr, text=True)
        self._wait_healthy(wait)
        return self

    def _child(self, **popen) -> subprocess.Popen:
        """``llm-serve`` in a child process, started cleanly (``python -m``); the options, API keys
        included, go through its environment, never its command line (which any user can list)."""
        env = {**os.environ, OPTIONS_ENV: self.options.to_env()}
        command = [sys.executable, "-m", "llm_training.cli.serve", "--from-env", "--host", self.host,
                   "--port", str(self.port), "--workers", str(self.workers)]  # fmt: skip
        return subprocess.Popen(command, env=env, **popen)

    def _serve_in_child(self) -> None:
        """Serve with worker processes until SIGINT/SIGTERM. uvicorn starts workers with multiprocessing's
        spawn, which imports the main module again: run in the user's process, a script without an
        ``if __name__ == "__main__":`` guard (the guide's) would start a server in every worker. Its
        supervisor runs in a child of its own session instead (Ctrl-C reaches it once, through here)."""
        import signal

        process = self._child(start_new_session=True)
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda number, _frame: process.send_signal(number))
        except ValueError:  # not the main thread: signals stay where they are
            pass
        try:
            code = process.wait()
        finally:
            if process.poll() is None:  # this process is leaving (an exception): so does the server
                process.terminate()
                process.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code != 0:
            raise ServerFailed(f"the server exited with status {code} (its error is in the log above)")

    def _wait_healthy(self, wait: float) -> None:
        import httpx

        # with protect_all, /health needs a key too
        headers = {"Authorization": f"Bearer {self.options.api_keys[0]}"} if self.options.api_keys else {}
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stderr.seek(0)
                lines = self.stderr.read().strip().splitlines()
                raise UserError(f"the server stopped while starting: {lines[-1] if lines else 'no message'}")
            try:
                if httpx.get(self.url + "/health", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise UserError(f"the server did not answer {self.url}/health within {wait:g} s")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM: the server finishes the requests in flight, then exits; returns its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stderr.close()
        return self.process.returncode


def serve(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the server in this process until SIGINT/SIGTERM (uvicorn; several worker processes if asked)."""
    from llm_training.serve.protocol import uvicorn_config

    grace = int(options.timeout) + 5  # requests in flight may finish after a SIGTERM
    if workers > 1:
        _check_model(options)
        _run_workers(options, host, port, workers, grace)
        return
    engine = make_engine(options)
    engine.load()  # here, so that a bad model path is an error before the port opens
    config = uvicorn_config(create_app(options, engine), options, host=host, port=port,
                            timeout_graceful_shutdown=grace)  # fmt: skip
    _graceful_server_class()(config).run()


def _check_model(options: ServeOptions) -> None:
    """Load the model once in the parent (on the CPU, then let go) before starting workers: a bad path or
    file is then one line and exit 2, not a traceback from every worker. It costs one more load at start."""
    import gc

    from llm_training.export.runtime import load_model

    loaded = load_model(options.model_path, "cpu", options.model_format)
    del loaded
    gc.collect()


def _run_workers(options: ServeOptions, host: str, port: int, workers: int, grace: int) -> None:
    """uvicorn's worker processes (each builds the app from the options in the environment), supervised by
    uvicorn's own supervisor; a worker that cannot start (at first, or when replacing one that died) stops
    the server with an error instead of a clean exit."""
    import inspect

    from uvicorn.supervisors.multiprocess import Multiprocess

    from llm_training.serve.protocol import uvicorn_config

    # an older uvicorn's supervisor takes a target and restarts a worker that cannot start, forever
    if "target" in inspect.signature(Multiprocess).parameters:
        raise UserError("--workers needs a newer uvicorn (0.54 is tested): pip install -U uvicorn")

    class Supervisor(Multiprocess):
        failed = False

        def keep_subprocess_alive(self) -> None:
            # uvicorn stops on a worker's start-up failure exactly as on a signal, by setting should_exit;
            # signals only queue here, so should_exit set by this call means a failure
            before = self.should_exit.is_set()
            super().keep_subprocess_alive()
            self.failed = self.failed or (not before and self.should_exit.is_set())

    os.environ[OPTIONS_ENV] = options.to_env()
    config = uvicorn_config("llm_training.serve.app:app_from_env", options, factory=True, host=host, port=port,
                            workers=workers, timeout_graceful_shutdown=grace)  # fmt: skip
    sock = config.bind_socket()
    supervisor = Supervisor(config, sockets=[sock])
    try:
        supervisor.run()
    finally:
        sock.close()
    if supervisor.failed:
        raise ServerFailed("a worker process failed to start (its error is in the log above); server stopped")


class ServerFailed(UserError):
    """The server stopped because a worker could not start (exit status 1: not the command line's fault)."""

    exit_code = 1


def _graceful_server_class():
    import contextlib
    import signal

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, but a SIGTERM or SIGINT that it handled (requests in flight finished) ends the
        process with status 0 instead of being raised again."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer
