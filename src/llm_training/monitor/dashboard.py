"""``MetricsDashboard``: a local web page with live charts of every training run under a folder (loss,
validation loss, learning rate, throughput, gradient norm, custom metrics), and the same charts as one
self-contained HTML file (``generate_report``) that works offline.

The runs are the ones ``llm-logs`` finds (``<output_dir>/logs/system.log``); their numbers come from each
run's ``metrics.jsonl``, read incrementally, so a run in another process shows up and updates while it
trains. Charts are drawn by plotly.js, served from the ``plotly`` package (never a CDN) and inlined in the
report. The server is FastAPI under uvicorn in a background thread.
"""

# no `from __future__ import annotations`: FastAPI reads the request model of a handler defined inside app()
import json
import logging
import math
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_training import events
from llm_training.errors import UserError
from llm_training.fileio import GENERATOR_META, check_output_file, html_output, write_text
from llm_training.monitor import runs as run_index
from llm_training.report.page import CSS, esc

log = logging.getLogger("llm_training.dashboard")

# chart id -> (title, y axis, the step_end key it plots); loss also plots eval_end's val_loss
CHARTS = {
    "loss": ("Loss (solid: training, dashed: validation)", "loss", "loss"),
    "lr": ("Learning rate", "learning rate", "lr"),
    "throughput": ("Throughput", "tokens / s", "tokens_per_second"),
    "grad_norm": ("Gradient norm", "norm", "grad_norm"),
}
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]  # fmt: skip
OWN = "added here"  # the series name of metrics given to add_metric
RUNNING_WITHIN = 180.0  # seconds since a run's last log line within which it counts as running


@dataclass
class _Series:
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)

    def add(self, x: float, y: float) -> None:
        self.x.append(x)
        self.y.append(y)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class MetricsDashboard:
    """``MetricsDashboard(port=8080).start()`` serves http://127.0.0.1:8080 with the runs under ``root``
    (default: the current folder), refreshed every ``refresh`` seconds. ``port=0`` takes any free port
    (``dashboard.url`` says which). ``add_metric(name, value=...)`` adds a point to a custom chart;
    ``generate_report(path)`` writes the charts to one HTML file. ``start()`` returns at once (the server
    runs in a background thread until ``stop()`` or the end of the program; ``wait()`` blocks)."""

    def __init__(
        self,
        port: int = 8080,
        host: str = "127.0.0.1",
        root: str | Path = ".",
        refresh: float = 2.0,
        title: str = "llm_training runs",
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise UserError(f"MetricsDashboard: port must be 0 to 65535, got {port}")
        if refresh <= 0:
            raise UserError(f"MetricsDashboard: refresh must be above 0 seconds, got {refresh}")
        self.port, self.host, self.root = int(port), host, Path(root)
        self.refresh, self.title = float(refresh), title
        self._own: dict[str, _Series] = {}
        self._tails: dict[Path, run_index.RecordTail] = {}
        self._parsed: dict[Path, tuple[tuple, list[run_index.Run]]] = {}  # log -> (its size and time, runs)
        self._modified: dict[Path, float] = {}  # log -> when it last changed
        self._models: dict[Path, tuple[tuple, dict]] = {}  # config.yaml -> (its size and time, its model)
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ data
    def add_metric(self, name: str, value: float, step: int | float | None = None) -> None:
        """One point of the custom chart ``name``: at ``step`` if given, else after the last point."""
        if not isinstance(name, str) or not name.strip():
            raise UserError("add_metric: name must be a non-empty string")
        number = _number(value)
        if number is None:
            raise UserError(f"add_metric({name!r}): value must be a finite number, got {value!r}")
        if step is not None and _number(step) is None:
            raise UserError(f"add_metric({name!r}): step must be a number, got {step!r}")
        with self._lock:
            series = self._own.setdefault(name.strip(), _Series())
            series.add(float(step) if step is not None else float(len(series.x) + 1), number)

    def _find_runs(self) -> list[run_index.Run]:
        """The runs under the root: a log is parsed again only when it changed (its size or time)."""
        parsed, self._modified = {}, {}
        for log in run_index.log_files(self.root):
            try:
                stat = log.stat()
            except OSError:
                continue
            key = (stat.st_mtime_ns, stat.st_size)
            known = self._parsed.get(log)
            parsed[log] = (
                known if known is not None and known[0] == key else (key, run_index.runs_in_log(log))
            )
            self._modified[log] = stat.st_mtime
        self._parsed = parsed
        return run_index.merge_runs(runs for _, runs in parsed.values())

    def snapshot(self) -> dict:
        """Every run's table row and series, the custom metrics, and the charts built from them."""
        with self._lock:
            runs = self._find_runs()
            rows, charts = [], {key: [] for key in CHARTS}
            custom: dict[str, list[tuple[str, _Series, str]]] = {}
            models = [_model_parts(self._model_of(run.folder), run.num_parameters) for run in runs]
            labels = _labels(runs, models)
            for index, (run, label) in enumerate(zip(runs, labels, strict=True)):
                color = COLORS[index % len(COLORS)]
                path = run.folder / "metrics.jsonl"
                tail = self._tails.setdefault(path, run_index.RecordTail(path))
                records = run_index.records_of(run, tail.read(), runs)
                series, extra, summary = _series_of(records)
                for key in CHARTS:
                    if series[key].x:
                        charts[key].append(_trace(label, series[key], color))
                if series["val_loss"].x:  # one legend entry a run: it shows and hides both lines
                    charts["loss"].append(_trace(f"{label} validation", series["val_loss"], color, label))
                for name, points in extra.items():
                    custom.setdefault(name, []).append((label, points, color))
                status = _status(run, runs, self._modified.get(run.log, 0.0))
                rows.append({"run": run.run_id, "label": label, "model": ", ".join(models[index]), "folder": str(run.folder),
                             "status": status, **summary})  # fmt: skip
            for name, points in self._own.items():
                custom.setdefault(name, []).append((OWN, _Series(list(points.x), list(points.y)), "#444"))
        figures = [_figure(key, *CHARTS[key][:2], charts[key]) for key in CHARTS]
        for name in sorted(custom):
            traces = [_trace(label, points, color) for label, points, color in custom[name]]
            figures.append(_figure(f"custom-{_slug(name)}", name, name, traces))
        return {
            "title": self.title,
            "root": str(self.root.resolve()),
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": rows,
            "charts": figures,
        }

    def _model_of(self, folder: Path) -> dict:
        """The ``model`` section of the run folder's ``config.yaml`` (read again only when it changed);
        empty when there is none or it cannot be read."""
        path = folder / "config.yaml"
        try:
            stat = path.stat()
        except OSError:
            return {}
        key = (stat.st_mtime_ns, stat.st_size)
        known = self._models.get(path)
        if known is None or known[0] != key:
            from llm_training.config import read_config_mapping

            model = (read_config_mapping(path) or {}).get("model")
            known = self._models[path] = (key, model if isinstance(model, dict) else {})
        return known[1]

    # ------------------------------------------------------------------------------------------ pages
    def page(self, live: bool, data: dict | None = None) -> str:
        """The dashboard page (``live``: polls ``api/data``) or the report (plotly.js and data inline), of
        ``data`` (a ``snapshot()``; taken now when not given)."""
        data = data or self.snapshot()
        return _html(data, plotly="" if live else _plotly_js(), refresh=self.refresh if live else 0.0)

    def generate_report(self, path: str | Path, data: dict | None = None) -> Path:
        """Write the charts of every run (of ``data``, a ``snapshot()``, when given) as one self-contained
        HTML file (no network needed to view it)."""
        target = Path(path)
        if target.is_dir():
            raise UserError(
                f"{target} is a folder; give the report's file name, e.g. {target / 'report.html'}"
            )
        check_output_file(target, "report", ours=html_output)  # never a file of the user's
        try:  # an earlier report stays whole until the new one is complete
            write_text(target, self.page(live=False, data=data))
        except OSError as exc:
            raise UserError(f"cannot write the report {target}: {exc.strerror or exc}") from None
        return target

    # ------------------------------------------------------------------------------------------ server
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self):
        """The FastAPI application: the page, plotly.js, /api/data, POST /api/metrics and /health."""
        from fastapi import FastAPI, HTTPException
        from fastapi.responses import HTMLResponse, JSONResponse, Response
        from pydantic import BaseModel

        class Point(BaseModel):
            name: str
            value: float
            step: float | None = None

        app = FastAPI(title="llm_training dashboard", docs_url=None, redoc_url=None)
        script = _plotly_js()

        @app.get("/", response_class=HTMLResponse)
        def index() -> str:
            return self.page(live=True)

        @app.get("/plotly.min.js")
        def plotly_js() -> Response:
            return Response(script, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

        @app.get("/api/data")
        def data() -> JSONResponse:
            return JSONResponse(self.snapshot())

        @app.post("/api/metrics")
        def add(point: Point) -> dict:
            try:
                self.add_metric(point.name, point.value, point.step)
            except UserError as exc:
                raise HTTPException(422, str(exc)) from None
            return {"ok": True}

        @app.get("/health")
        def health() -> dict:
            return {"status": "ok"}

        return app

    def start(self, wait: float = 30.0) -> "MetricsDashboard":
        """Serve in a background thread; returns once the page answers."""
        import uvicorn

        if self._thread is not None and self._thread.is_alive():
            return self
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise UserError(
                f"the dashboard cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); "
                "pass another port, or port=0 for any free one"
            ) from None
        sock.listen(128)
        self.port = sock.getsockname()[1]
        # open connections (a page polling) get 5 s to finish when stopped; then the server ends for sure
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="llm-dashboard", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + wait
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise UserError(f"the dashboard did not start on {self.url}; see the messages above")
            time.sleep(0.02)
        log.info("dashboard: %s (runs under %s)", self.url, self.root.resolve())
        return self

    def wait(self) -> bool:
        """Block until the server stops, or Ctrl-C (SIGINT) or SIGTERM stops it; returns whether its thread
        ended. The signals get handlers of their own: a KeyboardInterrupt may land anywhere, and a SIGINT
        ignored by the parent process (a background job of a script inherits that) would never stop it."""
        asked = threading.Event()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, lambda *_: asked.set())
        try:
            while self._thread is not None and self._thread.is_alive() and not asked.is_set():
                asked.wait(0.5)
        except KeyboardInterrupt:  # raised by a handler installed elsewhere
            pass
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self.stop()

    def stop(self, wait: float = 30.0) -> bool:
        """Stop the server (the page stops updating); start() may be called again. Open connections get 5 s
        (uvicorn's graceful timeout); a server thread still alive after ``wait`` seconds is left to end with
        the process (it is a daemon); returns whether it ended."""
        if self._server is not None:
            self._server.should_exit = True
        ended = True
        if self._thread is not None:
            self._thread.join(wait)
            ended = not self._thread.is_alive()
            if not ended:
                log.warning("dashboard: the server did not stop within %.0f s; leaving it", wait)
        self._server = self._thread = None
        return ended


# ---------------------------------------------------------------------------------------------- helpers
def _series_of(records: list[dict]) -> tuple[dict[str, _Series], dict[str, _Series], dict]:
    """One run's records as series by key, its custom metrics by name, and its table row's numbers."""
    series = {key: _Series() for key in [*CHARTS, "val_loss"]}
    extra: dict[str, _Series] = {}
    summary: dict[str, Any] = {"step": None, "loss": None, "best_val_loss": None, "tokens_per_second": None}
    last = {}  # step -> index, so that a step logged again (after a resume or rollback) replaces its point
    for record in records:
        step = _number(record.get("step"))
        kind = record.get("event")
        if kind == events.STEP_END and step is not None:
            for key in CHARTS:
                value = _number(record.get(CHARTS[key][2]))
                if value is not None:
                    _put(series[key], last, key, step, value)
            summary["step"] = int(step)
            summary["loss"] = _number(record.get("loss")) or summary["loss"]
            summary["tokens_per_second"] = (
                _number(record.get("tokens_per_second")) or summary["tokens_per_second"]
            )
        elif kind == events.EVAL_END and step is not None:
            value = _number(record.get("val_loss"))
            if value is not None:
                _put(series["val_loss"], last, "val_loss", step, value)
                best = summary["best_val_loss"]
                summary["best_val_loss"] = value if best is None else min(best, value)
        elif kind == events.METRIC and isinstance(record.get("name"), str):
            value = _number(record.get("value"))
            if value is not None:
                points = extra.setdefault(record["name"], _Series())
                points.add(step if step is not None else float(len(points.x) + 1), value)
    return series, extra, summary


def _status(run: run_index.Run, runs: list[run_index.Run], modified: float) -> str:
    """A run without a run_end line is running while its log grows (``modified``: when it last changed),
    else stopped (killed, or its machine went away); only the newest run of a folder can still be running."""
    if run.status != run_index.Run.status:
        return run.status
    newest = max((r for r in runs if r.folder == run.folder), key=run_index.started_at)
    recent = time.time() - modified < RUNNING_WITHIN
    return "running" if recent and newest is run else "stopped"


def _put(series: _Series, last: dict, key: str, step: float, value: float) -> None:
    index = last.get((key, step))
    if index is not None and index < len(series.y):
        series.y[index] = value
        return
    if series.x and step < series.x[-1]:  # a rollback: the later points are replaced as they come again
        keep = sum(1 for x in series.x if x < step)
        del series.x[keep:], series.y[keep:]
        for k in [k for k in last if k[0] == key and k[1] >= step]:
            del last[k]
    last[(key, step)] = len(series.x)
    series.add(step, value)


def _model_parts(model: dict, num_parameters: int | None) -> list[str]:
    """``["llama 2x64", "135K params"]``: the model's type, layers x width and size, of what is known."""
    shape = ""
    if isinstance(model.get("num_layers"), int) and isinstance(model.get("hidden_size"), int):
        shape = f"{model['num_layers']}x{model['hidden_size']}"
    name = " ".join(str(part) for part in (model.get("model_type"), shape) if part)
    return [part for part in (name, f"{_count(num_parameters)} params" if num_parameters else "") if part]


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _labels(runs: list[run_index.Run], models: list[list[str]]) -> list[str]:
    """What the legends call each run: its folder's name and its model (``experiment_1 · llama 2x64 ·
    135K``), with the run id where that is not enough to tell runs apart (a resumed run's folder)."""
    labels = [
        " · ".join([run.folder.resolve().name, *(part.removesuffix(" params") for part in model)])
        for run, model in zip(runs, models, strict=True)
    ]
    return [
        f"{label} · {run.run_id}" if labels.count(label) > 1 else label
        for run, label in zip(runs, labels, strict=True)
    ]


def _trace(name: str, series: _Series, color: str, group: str | None = None) -> dict:
    """A line; ``group``: a dashed line that shares the legend entry of the run's solid one."""
    trace = {
        "type": "scatter",
        "mode": "lines+markers" if len(series.x) < 40 else "lines",
        "name": name,
        "x": series.x,
        "y": series.y,
        "line": {"color": color, "width": 2, **({"dash": "dash"} if group else {})},
        "marker": {"size": 5, "color": color},
        "legendgroup": group or name,
    }
    return {**trace, "showlegend": False} if group else trace


def _figure(key: str, title: str, y_title: str, traces: list[dict]) -> dict:
    """The chart; its title is drawn by the page above it, where plotly's toolbar cannot cover it, and the
    legend sits at the bottom of the figure, below the "step" axis title (a figure a legend row taller)."""
    entries = sum(1 for t in traces if t.get("showlegend", True))
    layout = {
        "xaxis": {"title": {"text": "step", "standoff": 6}, "automargin": True},
        "yaxis": {"title": {"text": y_title}, "automargin": True},
        "margin": {"l": 60, "r": 20, "t": 30, "b": 40},
        "height": 320 + 22 * max(0, entries - 1),
        "showlegend": entries > 0,
        "legend": {
            "orientation": "h",
            "tracegroupgap": 0,
            "x": 0,
            "xanchor": "left",
            "y": 0,
            "yref": "container",
            "yanchor": "bottom",
        },
        "uirevision": key,  # zoom and hidden traces survive the updates
        "template": {"layout": {"paper_bgcolor": "#fff", "plot_bgcolor": "#fafbfc"}},
    }
    if not traces:
        layout["annotations"] = [{"text": "no data yet", "showarrow": False, "font": {"size": 14},
                                  "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}]  # fmt: skip
    return {"id": key, "title": title, "data": traces, "layout": layout}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "metric"


def _plotly_js() -> str:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise UserError(
            "the dashboard draws its charts with plotly: pip install 'llm-training[monitor]'"
        ) from None
    return get_plotlyjs()


SCRIPT = """
const REFRESH = %(refresh)s;
function cell(row, value, cls) {
  const td = row.insertCell(); td.textContent = value === null || value === undefined ? "-" : value;
  if (cls) td.className = cls;
}
function fixed(value, digits) { return value === null || value === undefined ? null : value.toFixed(digits); }
function draw(data) {
  document.getElementById("updated").textContent = data.updated;
  const body = document.getElementById("runs");
  body.replaceChildren();
  for (const run of data.runs) {
    const row = body.insertRow();
    cell(row, run.run, "l"); cell(row, run.model, "l"); cell(row, run.status, "l"); cell(row, run.step);
    cell(row, fixed(run.loss, 4)); cell(row, fixed(run.best_val_loss, 4));
    cell(row, run.tokens_per_second === null ? null : Math.round(run.tokens_per_second).toLocaleString());
    cell(row, run.folder, "l");
  }
  document.getElementById("none").hidden = data.runs.length > 0;
  const charts = document.getElementById("charts");
  for (const chart of data.charts) {
    let div = document.getElementById("chart-" + chart.id);
    if (!div) {
      const box = document.createElement("div"); box.className = "chart";
      const title = document.createElement("h3"); title.textContent = chart.title;
      div = document.createElement("div"); div.id = "chart-" + chart.id;
      box.append(title, div); charts.appendChild(box);
    }
    Plotly.react(div, chart.data, chart.layout, {responsive: true, displaylogo: false});
  }
}
async function poll() {
  const state = document.getElementById("state");
  try {
    const answer = await fetch("api/data", {cache: "no-store"});
    if (!answer.ok) throw new Error(answer.status);
    draw(await answer.json());
    state.textContent = "live, every " + REFRESH + " s"; state.className = "ok";
  } catch (error) {
    state.textContent = "cannot reach the dashboard server"; state.className = "fail";
  }
  setTimeout(poll, REFRESH * 1000);
}
draw(JSON.parse(document.getElementById("data").textContent));
if (REFRESH > 0) setTimeout(poll, REFRESH * 1000);
"""

STYLE = """
body { max-width: 1500px; }
#charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1rem; }
.chart { border: 1px solid #d9e1ea; border-radius: 6px; padding: 0.3rem; min-height: 330px; }
#runs td:nth-child(-n+3) { white-space: nowrap; }
.chart h3 { font-size: 15px; font-weight: 600; text-align: center; margin: 0.4rem 0 0; }
"""


def _html(data: dict, plotly: str, refresh: float) -> str:
    """The page: plotly.js inline (the report) or from the server, the snapshot as JSON, the drawing script."""
    payload = json.dumps(data).replace("</", "<\\/")  # nothing in the data can close the script element
    script = (
        f"<script>{plotly}</script>" if plotly else "<script src='plotly.min.js'></script>"
    )  # the report inlines plotly.js; the live page loads it from its own server
    state = (
        f"<span id='state' class='ok'>live, every {refresh:g} s</span>"
        if refresh
        else "<span id='state'>report</span>"
    )
    header = ["run", "model", "status", "step", "train loss", "best val loss", "tokens/s", "folder"]
    head = "".join(
        f"<th{' class=l' if h in ('run', 'model', 'status', 'folder') else ''}>{esc(h)}</th>" for h in header
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        + GENERATOR_META
        + f"<title>{esc(data['title'])}</title><style>{CSS}{STYLE}</style>{script}</head><body>"
        f"<h1>{esc(data['title'])}</h1>"
        f"<p class='sub'>Runs under <code>{esc(data['root'])}</code> &middot; updated "
        f"<span id='updated'>{esc(data['updated'])}</span> &middot; {state}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody id='runs'></tbody></table>"
        "<p id='none' class='note' hidden>No runs yet: a training run writes "
        "<code>&lt;output_dir&gt;/logs/system.log</code> and <code>metrics.jsonl</code>.</p>"
        "<div id='charts'></div>"
        f"<script type='application/json' id='data'>{payload}</script>"
        f"<script>{SCRIPT % {'refresh': json.dumps(refresh)}}</script></body></html>\n"
    )
