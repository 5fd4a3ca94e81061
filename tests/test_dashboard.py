"""The dashboard: charts of real runs (trained by llm-train), custom metrics, the live page in a real headless
Chromium (driven by Playwright) updating while a run trains, the offline report, and bad inputs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import TINY_MODEL, assert_user_error, prepared_plays, run_cli, set_flags
from llm_training import MetricsDashboard, events
from llm_training.errors import UserError
from llm_training.events import EventBus
from llm_training.monitor.files import MetricsFileSink, step_losses

TRAIN = ["-m", "llm_training.cli.train"]
SHOTS = os.environ.get("LLM_TRAINING_SCREENSHOTS")  # a folder to copy the screenshots to (the README's)
HAS_DATA = "(id) => { const d = document.getElementById(id); return d && d.data && d.data.length > 0 && d.data[0].x.length > 0 }"  # fmt: skip


def train_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [*TRAIN, "--data-dir", str(data), "--output-dir", str(out), *TINY_MODEL,
            *set_flags({"training.batch_size": 8, "training.max_steps": steps, "training.log_interval": 2,
                        "training.eval_interval": 10, "training.eval_batches": 2, "training.sample_tokens": 0,
                        "logging.progress_bar": False, "training.learning_rate": 3e-3}), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_plays(tmp_path_factory.mktemp("dashdata"), 3)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Two finished runs (20 steps at lr 6e-3, 30 at 3e-3) in two output folders under one root."""
    root = tmp_path_factory.mktemp("runs")
    for name, steps, lr in (("small", 20, "6e-3"), ("longer", 30, "3e-3")):
        proc = run_cli(train_args(data, root / name, steps, "--set", f"training.learning_rate={lr}"), root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def chart(snapshot: dict, key: str) -> dict:
    return next(c for c in snapshot["charts"] if c["id"] == key)


def test_every_run_is_charted_with_its_own_numbers(runs):
    from llm_training.train.artifacts import load_trained

    snapshot = MetricsDashboard(port=0, root=runs).snapshot()
    assert [(r["status"], r["step"]) for r in snapshot["runs"]] == [("completed", 20), ("completed", 30)]
    loss = chart(snapshot, "loss")["data"]
    train = [t for t in loss if not t["name"].endswith("validation")]
    assert len(train) == 2 and len(loss) == 4  # a training and a validation trace a run
    # each run is named by its folder and its model (type, layers x width, parameters), not by its id
    model = load_trained(runs / "small" / "checkpoints" / "model_final.pt").model
    size = sum(p.numel() for p in model.parameters())
    assert 100_000 < size < 1_000_000  # TINY_MODEL
    labels = [f"{name} · {model.cfg.model_type} 2x64 · {size / 1000:.3g}K" for name in ("small", "longer")]
    assert [t["name"] for t in train] == labels == [r["label"] for r in snapshot["runs"]]
    assert [r["model"] for r in snapshot["runs"]] == [
        f"{model.cfg.model_type} 2x64, {size / 1000:.3g}K params"
    ] * 2
    validation = [t for t in loss if t["name"].endswith("validation")]
    assert [t["name"] for t in validation] == [f"{label} validation" for label in labels]
    # one legend entry a run: its validation line shows and hides with its training line
    assert [t["legendgroup"] for t in validation] == [t["legendgroup"] for t in train] == labels
    assert all(t["showlegend"] is False for t in validation) and all("showlegend" not in t for t in train)
    for trace, row in zip(train, snapshot["runs"], strict=True):
        logged = step_losses(Path(row["folder"]) / "metrics.jsonl")
        assert dict(zip(trace["x"], trace["y"], strict=True)) == {float(s): v for s, v in logged.items()}
        assert row["loss"] == logged[max(logged)]
    for key in ("lr", "throughput", "grad_norm"):
        assert all(len(t["x"]) > 3 and all(y > 0 for y in t["y"]) for t in chart(snapshot, key)["data"]), key


def test_custom_metrics_from_add_metric_and_from_a_run(runs, tmp_path):
    dashboard = MetricsDashboard(port=0, root=runs)
    dashboard.add_metric("custom_score", value=0.95)
    dashboard.add_metric("custom_score", value=0.97)
    dashboard.add_metric("custom_score", value=0.5, step=100)
    # a run's own scalar, published on its event bus, lands in its metrics.jsonl
    bus = EventBus()
    folder = Path(dashboard.snapshot()["runs"][1]["folder"])
    before = (folder / "metrics.jsonl").read_text()
    sink = MetricsFileSink(bus, folder / "metrics.jsonl")
    bus.publish(events.METRIC, name="bleu", value=0.25, step=30)
    sink.close()
    try:
        traces = chart(dashboard.snapshot(), "custom-custom-score")["data"]
        assert [(t["name"], t["x"], t["y"]) for t in traces] == [
            ("added here", [1.0, 2.0, 100.0], [0.95, 0.97, 0.5])
        ]
        bleu = chart(dashboard.snapshot(), "custom-bleu")["data"]
        assert [(t["x"], t["y"]) for t in bleu] == [([30.0], [0.25])]
        assert bleu[0]["name"] == dashboard.snapshot()["runs"][1]["label"]
        assert bleu[0]["name"].startswith("longer · ")
    finally:
        (folder / "metrics.jsonl").write_text(before)


def _browser(playwright):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium); the page is checked in it")
    return playwright.chromium.launch(
        executable_path=chromium,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    )  # fmt: skip


def _shot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape[0] > 500 and (pixels < 128).mean() > 0.003  # text and lines drawn, not a blank page
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SHOTS) / path.name)


BOX = "(el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; }"


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _check_layout(page) -> None:
    """Every chart's title is clear of plotly's toolbar (shown while the pointer is over the chart), its
    "step" axis title clear of its legend, and the legend inside the chart."""
    for i in range(page.locator("#charts .chart").count()):
        box = page.locator("#charts .chart").nth(i)
        title = box.locator("h3")
        assert title.count() == 1 and title.inner_text(), f"chart {i} has no title above it"
        plot = box.locator(".js-plotly-plot")
        plot.hover()  # the toolbar shows (it is laid out, invisible, before)
        toolbar = plot.locator(".modebar").evaluate(BOX)
        assert not _overlap(title.evaluate(BOX), toolbar), title.inner_text()
        if plot.locator(".legend").count():
            legend, step = plot.locator(".legend").evaluate(BOX), plot.locator(".g-xtitle").evaluate(BOX)
            assert not _overlap(step, legend) and step[3] <= legend[1], title.inner_text()
            assert legend[3] <= plot.evaluate(BOX)[3] + 1, title.inner_text()  # not cut off at the bottom


def test_live_page_in_chromium_updates_while_a_run_trains(runs, data, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(runs / "small", root / "small")  # a finished run beside the one that trains
    dashboard = MetricsDashboard(port=0, root=root, refresh=0.5).start()
    live = subprocess.Popen(  # steps it never reaches: it trains until the test stops it
        [sys.executable, *train_args(data, root / "live", 100_000, "--set", "training.log_interval=1",
                                     "--set", "training.num_epochs=100000")],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with sync_api.sync_playwright() as playwright:
            browser = _browser(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(dashboard.url, wait_until="load")
            page.wait_for_function(HAS_DATA, arg="chart-loss", timeout=300_000)
            # the live run's trace appears, then grows without a reload
            count = "() => { const t = document.getElementById('chart-loss').data.filter(t => t.name !== undefined && !t.name.endsWith('validation')); return t.length > 1 ? t[1].x.length : 0 }"  # fmt: skip
            page.wait_for_function(f"() => ({count})() > 0", timeout=300_000)
            first = page.evaluate(count)
            page.wait_for_function(f"() => ({count})() > {first + 3}", timeout=300_000)
            assert live.poll() is None, "the run ended before the page showed it growing"
            assert page.inner_text("#state").startswith("live")
            rows = page.locator("#runs tr")
            assert rows.count() == 2
            assert {rows.nth(i).locator("td").nth(2).inner_text() for i in (0, 1)} == {"completed", "running"}
            _check_layout(page)
            # a custom metric sent over HTTP gets its own chart on the open page
            answer = httpx.post(dashboard.url + "/api/metrics", json={"name": "custom_score", "value": 0.95})
            assert answer.status_code == 200
            page.wait_for_function(HAS_DATA, arg="chart-custom-custom-score", timeout=300_000)
            for key in ("lr", "throughput", "grad_norm"):
                assert page.evaluate(HAS_DATA, f"chart-{key}"), key
            time.sleep(0.5)  # let plotly finish drawing
            _shot(page, tmp_path / "dashboard.png")
            browser.close()
    finally:
        live.send_signal(signal.SIGINT)  # the run stops cleanly (checkpoint, run_end)
        try:
            live.wait(120)
        finally:
            if live.poll() is None:
                live.kill()
        dashboard.stop()
    assert live.returncode == 0, live.stderr.read()[-3000:]


def test_report_is_one_file_that_draws_offline(runs, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    dashboard = MetricsDashboard(port=0, root=runs, title="Two runs")
    dashboard.add_metric("custom_score", value=0.95)
    report = dashboard.generate_report(tmp_path / "results" / "metrics_report.html")
    text = report.read_text()
    assert not re.search(
        r"<script[^>]*\ssrc=|<link\b|<img\b|<iframe\b", text
    )  # nothing loaded from elsewhere
    assert "Plotly" in text and len(text) > 1_000_000  # plotly.js inline
    with sync_api.sync_playwright() as playwright:
        browser = _browser(playwright)
        context = browser.new_context(offline=True, viewport={"width": 1400, "height": 900})
        asked = []
        context.route("**/*", lambda route: (asked.append(route.request.url), route.continue_()))
        page = context.new_page()
        page.goto(report.as_uri(), wait_until="load")
        for key in ("loss", "lr", "throughput", "grad_norm", "custom-custom-score"):
            page.wait_for_function(HAS_DATA, arg=f"chart-{key}", timeout=300_000)
        assert page.evaluate("document.getElementById('chart-loss').data.length") == 4
        assert page.locator("#runs tr").count() == 2 and page.inner_text("#state") == "report"
        assert page.locator("#chart-loss .scatterlayer .trace").count() == 4  # drawn, not only given
        assert [url for url in asked if not url.startswith("file://")] == []
        _check_layout(page)
        assert page.locator("#chart-loss .legend .traces").count() == 2  # a legend entry a run
        legend = page.locator("#chart-loss .legend").text_content()
        assert "small · " in legend and "longer · " in legend and "2x64" in legend
        time.sleep(0.5)
        _shot(page, tmp_path / "report.png")
        browser.close()


def test_bad_inputs_are_one_clear_error(runs, tmp_path):
    dashboard = MetricsDashboard(port=0, root=runs)
    with pytest.raises(UserError, match="finite number"):
        dashboard.add_metric("score", value="high")
    with pytest.raises(UserError, match="non-empty"):
        dashboard.add_metric("", value=1.0)
    with pytest.raises(UserError, match="port must be"):
        MetricsDashboard(port=70000)
    with pytest.raises(UserError, match="is a folder"):
        dashboard.generate_report(tmp_path)
    good = dashboard.generate_report(tmp_path / "r.html")
    kept = good.read_bytes()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write the report"):
        dashboard.generate_report(tmp_path / "file" / "r.html")
    assert good.read_bytes() == kept

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(UserError, match="port=0 for any free one"):
            MetricsDashboard(port=busy.getsockname()[1]).start()
    finally:
        busy.close()
    server = MetricsDashboard(port=0, root=runs).start()
    try:
        answer = httpx.post(server.url + "/api/metrics", json={"name": "x", "value": "high"})
        assert answer.status_code == 422
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    finally:
        server.stop()

    assert_user_error(run_cli(["-m", "llm_training.cli.dashboard", "--root", str(tmp_path / "nope")], tmp_path),
                      "--root", "no such folder")  # fmt: skip


def test_cli_writes_the_report(runs, tmp_path):
    proc = run_cli(["-m", "llm_training.cli.dashboard", "--root", str(runs), "--report", "out/report.html"],
                   tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 run(s)" in proc.stdout and (tmp_path / "out" / "report.html").stat().st_size > 1_000_000


def test_cli_serves_until_ctrl_c(runs, tmp_path):
    from conftest import free_port, wait_for_health

    port = free_port()
    with open(tmp_path / "err", "w") as err:
        server = subprocess.Popen([sys.executable, "-m", "llm_training.cli.dashboard", "--root", str(runs),
                                   "--port", str(port)], stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
    try:
        wait_for_health(f"http://127.0.0.1:{port}")
        data = httpx.get(f"http://127.0.0.1:{port}/api/data").json()
        assert len(data["runs"]) == 2 and "Plotly" in httpx.get(f"http://127.0.0.1:{port}/plotly.min.js").text
    finally:
        server.send_signal(signal.SIGINT)
        try:
            out, _ = server.communicate(timeout=600)  # a busy machine can take a while to shut down
        finally:
            if server.poll() is None:  # never left running after a failure
                server.kill()
    assert server.returncode == 0 and f"dashboard: http://127.0.0.1:{port}" in out, (
        tmp_path / "err"
    ).read_text()
