"""The page of ``llm-compare``: a table of every metric per model, which model is best by each metric (or that
the models are indistinguishable, within noise), and one bar chart per metric with its 95% error bars."""

from __future__ import annotations

from llm_training.report.page import BLUE, esc, figure, page, svg, table

NO_STEP = "—"  # an export records no training step


def _signed(x: float) -> str:
    return f"{x:+.4g}".replace("-", "−")


def verdict_line(v: dict) -> str:
    """One line of plain text on one metric (``noise.compare_metric``'s verdict)."""
    m, better = v["metric"], f"{v['better']} is better"
    if not v["comparable"]:
        return f"{m}: not comparable ({v['reason']})"
    order, diffs = v["order"], v["differences"]
    if len(order) == 1:
        return f"{m}: {order[0]} (one model)"
    if "units" not in v:  # no noise estimate: the order only
        gap = f" by {_signed(diffs[0]['difference'])}" if diffs else ""
        return (f"{m} ({better}): {order[0]} ahead of {order[1]}{gap}, but the noise is {v['noise']}, so "
                "no model is named best")  # fmt: skip
    if len(v["best"]) > 1:
        worst = max((d for d in diffs if d["within_noise"]), key=lambda d: abs(d["difference"]))
        line = (f"{m} ({better}): {', '.join(v['best'])} are indistinguishable (differences up to "
                f"{_signed(worst['difference'])}, within the noise of ±{worst['margin']:.4g}); no single best")  # fmt: skip
    else:
        d = diffs[0]
        line = (f"{m} ({better}): best {order[0]}; next {d['model']} by {_signed(d['difference'])} "
                f"(noise ±{d['margin']:.4g})")  # fmt: skip
    return f"{line} [{v['noise']}]"


def ranking_line(v: dict | None) -> str:
    """The models in order of the ranking metric, those within noise of the best marked."""
    if v is None or not v["comparable"]:
        return ""
    tied = set(v["best"]) if "units" in v else set()
    marks = [f"{k + 1}. {name}" + (" (indistinguishable from 1)" if k and name in tied else "")
             for k, name in enumerate(v["order"])]  # fmt: skip
    return f"ranked by {v['metric']} ({v['better']} is better): " + ", ".join(marks)


def render(
    results: list[dict], metrics: list[str], test_data: str, verdicts: list[dict] | None = None,
    ranked_by: str | None = None,
) -> str:  # fmt: skip
    verdicts = verdicts or []
    by_metric = {v["metric"]: v for v in verdicts}
    header = ["model", "step", *metrics]
    step = lambda r: NO_STEP if r.get("step") is None else r["step"]  # noqa: E731
    rows = [[r["model"], step(r), *(f"{r[m]:.4f}" for m in metrics)] for r in results]
    lines = [ranking_line(by_metric.get(ranked_by))] if ranked_by in by_metric else []
    lines += [verdict_line(v) for v in verdicts]
    plots = []
    for i, m in enumerate(metrics):
        fig, ax = figure(max(4.0, 1.2 * len(results) + 2), 3.0)
        labels = [f"{k + 1}" for k in range(len(results))]
        spread = by_metric.get(m, {}).get("standard_error")
        errors = [1.96 * spread[r["model"]] for r in results] if spread else None
        ax.bar(labels, [r[m] for r in results], color=BLUE, yerr=errors, capsize=4 if errors else 0)
        apart = by_metric.get(m, {}).get("comparable") is False
        ax.set_title(
            m + (" (bars: 95% intervals)" if errors else "") + (" (not comparable)" if apart else "")
        )
        ax.set_xlabel("model (numbered as in the table)")
        for k, r in enumerate(results):
            ax.annotate(
                f"{r[m]:.3g}", (k, r[m] + (errors[k] if errors else 0)), ha="center", va="bottom", fontsize=8
            )
        plots.append(f"<div class='plot'>{svg(fig, f'compare-{i}')}</div>")
    numbered = [[k + 1, *row] for k, row in enumerate(rows)]
    summary = "<p>" + "<br>".join(esc(line) for line in lines) + "</p>" if lines else ""
    sections = [
        ("table", "Metrics", table(["#", *header], numbered, left=(1,)) + summary),
        ("plots", "Plots", "<div class='plots'>" + "".join(plots) + "</div>"),
    ]
    subtitle = f"{len(results)} models on <code>{esc(test_data)}</code>"
    return page(f"Model comparison: {test_data}", "Model comparison", subtitle, sections)
