"""The page of ``llm-compare``: a table of every metric per model and one bar chart per metric."""

from __future__ import annotations

from llm_training.report.page import BLUE, esc, figure, page, svg, table

LOWER_IS_BETTER = {"loss", "perplexity", "bits_per_byte"}


def render(results: list[dict], metrics: list[str], test_data: str) -> str:
    names = [r["model"] for r in results]
    header = ["model", "step", *metrics]
    rows = [[r["model"], r.get("step", ""), *(f"{r[m]:.4f}" for m in metrics)] for r in results]
    best = []
    for m in metrics:
        values = [r[m] for r in results]
        pick = min if m in LOWER_IS_BETTER else max
        best.append(
            f"{m}: <b>{esc(names[values.index(pick(values))])}</b> ({'lower' if m in LOWER_IS_BETTER else 'higher'} is better)"
        )
    plots = []
    for i, m in enumerate(metrics):
        fig, ax = figure(max(4.0, 1.2 * len(results) + 2), 3.0)
        labels = [f"{k + 1}" for k in range(len(results))]
        ax.bar(labels, [r[m] for r in results], color=BLUE)
        ax.set_title(m)
        ax.set_xlabel("model (numbered as in the table)")
        for k, r in enumerate(results):
            ax.annotate(f"{r[m]:.3g}", (k, r[m]), ha="center", va="bottom", fontsize=8)
        plots.append(f"<div class='plot'>{svg(fig, f'compare-{i}')}</div>")
    numbered = [[k + 1, *row] for k, row in enumerate(rows)]
    sections = [
        ("table", "Metrics", table(["#", *header], numbered, left=(1,)) + "<p>" + "<br>".join(best) + "</p>"),
        ("plots", "Plots", "<div class='plots'>" + "".join(plots) + "</div>"),
    ]
    subtitle = f"{len(results)} models on <code>{esc(test_data)}</code>"
    return page(f"Model comparison: {test_data}", "Model comparison", subtitle, sections)
