"""The HTML page of ``llm-analyze-data``: one self-contained file that works offline.

Plots are matplotlib figures saved as SVG and inlined (``Figure`` objects directly, so no pyplot and no
global backend is touched; text drawn as paths, so no fonts are needed); CSS is inline; nothing refers to
a URL. Every string that comes from the data (token texts, document ids, snippets, paths) is HTML-escaped.
"""

from __future__ import annotations

import numpy as np

from llm_training.data.inspect import Analysis
from llm_training.report.page import BLUE, GREY, RED, esc, figure, num, page, svg, table

SECTIONS = (
    ("summary", "Summary"),
    ("lengths", "Document lengths"),
    ("tokens", "Token frequency"),
    ("quality", "Quality scores"),
    ("filtering", "Deduplication and filtering"),
)


# ------------------------------------------------------------------------------------------ sections
def _summary(a: Analysis) -> str:
    rows = []
    totals = {"documents": 0, "tokens": 0, "bytes": 0}
    for name, s in a.summary.items():
        rows.append(
            [
                name,
                num(s["documents"]),
                num(s["tokens"]),
                num(s["bytes"]),
                num(s["bytes_per_token"], 3),
                num(s["vocab_size"] or 0),
                s["dtype"],
                num(s["shards"]),
            ]
        )
        for key in totals:
            totals[key] += s[key]
    text_tokens = totals["tokens"] - totals["documents"]
    rows.append(
        [
            "total",
            num(totals["documents"]),
            num(totals["tokens"]),
            num(totals["bytes"]),
            num(totals["bytes"] / max(1, text_tokens), 3),
            num(a.vocab_size),
            "",
            "",
        ]
    )
    grid = table(
        ["split", "documents", "tokens", "bytes", "bytes/token", "vocab size", "dtype", "shards"],
        rows,
        left=(0, 6),
    )
    r = a.report
    facts = []
    if r.get("source"):
        facts.append(f"source <code>{esc(r['source'])}</code>")
    if "documents_read" in r:
        facts.append(f"{num(r['documents_read'])} documents ({num(r.get('bytes_read', 0))} bytes) read")
    if r.get("split"):
        facts.append(f"split: {esc(r['split'])}")
    if r.get("tokenizer"):
        facts.append(f"tokenizer {esc(r['tokenizer'])}")
    if "seconds" in r:
        facts.append(f"prepared in {r['seconds']:.1f} s")
    notes = (
        "<p class='note'>Tokens include one end-of-text token per document; bytes/token counts text tokens "
        "only. " + "; ".join(facts) + ".</p>"
    )
    js = ""
    if a.js is not None:
        js = (
            f"<p>Jensen-Shannon divergence of the train and validation unigram distributions: "
            f"<b>{a.js:.4f}</b> bits (0: identical, 1: disjoint).</p>"
        )
    return grid + notes + js


def _lengths(a: Analysis) -> str:
    tokens = a.num_tokens
    if tokens.size == 0:
        return "<p>No documents in this split.</p>"
    fig, ax = figure()
    low, high = max(1, int(tokens.min())), int(tokens.max())
    wide = high / low > 100
    bins = np.geomspace(low, high + 1, 50) if wide else np.linspace(low, high + 1, 50)
    ax.hist(tokens, bins=bins, color=BLUE, edgecolor="white", linewidth=0.4)
    median = float(np.median(tokens))
    ax.axvline(median, color=RED, linestyle="--", linewidth=1.2, label=f"median {median:,.0f}")
    if wide:
        ax.set_xscale("log")
    ax.set_xlabel("tokens per document (end-of-text included)" + (", log scale" if wide else ""))
    ax.set_ylabel("documents")
    ax.set_title(f"{a.split}: {tokens.size:,} documents")
    ax.legend(frameon=False)
    rows = []
    for key in ("min", "p10", "median", "mean", "p90", "p99", "max"):
        rows.append([key, num(a.lengths["tokens"][key]), num(a.lengths["bytes"][key])])
    grid = table(["statistic", "tokens", "bytes"], rows)
    return f"<div class='plots'><div class='plot'>{svg(fig, 'lengths')}</div>{grid}</div>"


def _tokens(a: Analysis) -> str:
    counts = np.sort(a.counts[a.counts > 0])[::-1]
    if counts.size == 0:
        return "<p>No tokens in this split.</p>"
    fig, ax = figure(6.5, 3.8)
    ranks = np.arange(1, counts.size + 1)
    ax.loglog(ranks, counts, color=BLUE, linewidth=1.5, label="observed")
    ax.loglog(ranks, counts[0] / ranks, color=GREY, linestyle="--", linewidth=1, label="Zipf (1/rank)")
    ax.set_xlabel("rank")
    ax.set_ylabel("occurrences")
    ax.set_title(f"{a.split}: {int(a.counts.sum()):,} tokens")
    ax.legend(frameon=False)
    rows = [
        [
            t["rank"],
            t["id"],
            f"<td class='tok l'>{esc(t['text'])}</td>",
            num(t["count"]),
            f"{t['share']:.2%}",
        ]
        for t in a.top
    ]
    body = "".join(
        f"<tr><td>{r[0]}</td><td>{r[1]}</td>{r[2]}<td>{r[3]}</td><td>{r[4]}</td></tr>" for r in rows
    )
    grid = (
        "<table><thead><tr><th>rank</th><th>id</th><th class='l'>token</th><th>count</th><th>share</th>"
        f"</tr></thead><tbody>{body}</tbody></table>"
    )
    used = int(np.count_nonzero(a.counts[: a.vocab_size]))
    note = (
        f"<p class='note'>{used:,} of {a.vocab_size:,} vocabulary ids occur in this split. Whitespace is shown "
        "as ␣ (space), \\n and \\t.</p>"
    )
    return (
        f"<div class='plots'><div class='plot'>{svg(fig, 'tokens')}</div>"
        f"<div><h3>Top {len(a.top)} tokens</h3>{grid}</div></div>{note}"
    )


def _quality(a: Analysis) -> str:
    report_hist = a.report.get("quality_histogram") or {}
    min_quality = (a.report.get("settings") or {}).get("min_quality")
    fig, ax = figure()
    bins = np.linspace(0.0, 1.0, 11)
    if report_hist.get("counts"):
        edges = np.asarray(report_hist.get("bins") or bins, dtype=float)
        counts = np.asarray(report_hist["counts"], dtype=float)
        ax.bar(
            edges[:-1],
            counts,
            width=np.diff(edges),
            align="edge",
            color=GREY,
            edgecolor="white",
            label=f"all scored documents ({int(counts.sum()):,}, before filtering)",
        )
    # the report's bins: int(score * 10), capped at 9; scores are stored as float32, so round first (0.7
    # is 0.69999999 in float32, and linspace's edge 0.7000000000000001 would put it one bin lower)
    kept = np.bincount(np.clip((np.round(a.quality, 5) * 10).astype(np.int64), 0, 9), minlength=10)
    ax.bar(
        bins[:-1],
        kept,
        width=0.1,
        align="edge",
        color=BLUE,
        edgecolor="white",
        label=f"kept {a.split} documents ({a.quality.size:,})",
    )
    if min_quality:
        ax.axvline(
            float(min_quality),
            color=RED,
            linestyle="--",
            linewidth=1.5,
            label=f"--min-quality {min_quality}",
        )
    ax.set_xlim(0, 1)
    ax.set_xlabel("quality score (0 to 1)")
    ax.set_ylabel("documents")
    ax.legend(frameon=False, loc="upper left")
    mean = float(a.quality.mean()) if a.quality.size else 0.0
    note = f"<p>Mean quality of the kept {esc(a.split)} documents: <b>{mean:.3f}</b>."
    if not min_quality:
        note += " Prepared without a quality bar (--min-quality 0)."
    if not report_hist.get("counts"):
        note += " The report holds no histogram of all scored documents (e.g. a merged folder)."
    return f"<div class='plot'>{svg(fig, 'quality')}</div>{note}</p>"


def _filtering(a: Analysis) -> str:
    r = a.report
    dropped = dict(r.get("dropped") or {})
    raw = r.get("problems") or {}  # prepare: {counts, examples}; a merged folder: {reason: count}
    problems = dict(raw.get("counts") or {}) if "counts" in raw else dict(raw)
    examples = list(raw.get("examples") or []) if "counts" in raw else []
    parts = []
    kept = sum(s["documents"] for s in a.summary.values())
    bars = {"kept": kept, **{k.replace("_", " "): v for k, v in dropped.items()}}
    bars.update({f"problem: {k.replace('_', ' ')}": v for k, v in problems.items()})
    fig, ax = figure(7.0, 0.6 + 0.42 * len(bars))
    names = list(bars)[::-1]
    values = [bars[n] for n in names]
    colors = [BLUE if n == "kept" else RED if n.startswith("problem") else "#ff7f0e" for n in names]
    ax.barh(names, values, color=colors)
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:,}", va="center", fontsize=9)
    ax.set_xlabel("documents")
    ax.set_xlim(0, max(values) * 1.15 if max(values) else 1)
    ax.set_title("kept and dropped documents, by reason")
    parts.append(f"<div class='plot'>{svg(fig, 'filtering')}</div>")
    settings = r.get("settings") or {}
    if settings:
        parts.append(
            f"<p class='note'>Settings: deduplicate {esc(settings.get('deduplicate'))}, near-duplicate "
            f"threshold {esc(settings.get('dedup_threshold'))}, min quality {esc(settings.get('min_quality'))}.</p>"
        )
    if problems:
        parts.append("<h3>Problems while reading</h3>")
        parts.append(table(["reason", "records"], [[k, num(v)] for k, v in problems.items()]))
        if examples:
            parts.append(
                table(
                    ["reason", "where", "detail"],
                    [
                        [e.get("reason"), f"{e.get('source')}:{e.get('line') or ''}", e.get("detail")]
                        for e in examples[:5]
                    ],
                    left=(0, 1, 2),
                )
            )
    duplicates = r.get("duplicates") or {}
    near = duplicates.get("near_examples") or []
    if near:
        parts.append("<h3>Near duplicates dropped (examples)</h3>")
        parts.append(
            table(
                ["document", "near duplicate of", "estimated similarity"],
                [[e.get("id"), e.get("duplicate_of"), f"{e.get('similarity', 0):.3f}"] for e in near[:10]],
                left=(0, 1),
            )
        )
    exact = duplicates.get("exact_examples") or []
    if exact:
        parts.append("<h3>Exact duplicates dropped (examples)</h3>")
        parts.append(
            table(
                ["document", "duplicate of"],
                [[e.get("id"), e.get("duplicate_of")] for e in exact[:10]],
                left=(0, 1),
            )
        )
    d = a.duplicates
    rows = [
        [f"{name}: repeats of an earlier document", num(d[name]["duplicates"]), f"{d[name]['fraction']:.2%}"]
        for name in a.summary
        if name in d
    ]
    cont = d.get("contamination", {})
    rows.append(
        [
            "validation documents also in train",
            num(cont.get("documents", 0)),
            f"{cont.get('fraction', 0):.2%}",
        ]
    )
    parts.append("<h3>Exact duplicates among the prepared documents (equal token ids)</h3>")
    parts.append(table(["", "documents", "share"], rows))
    if cont.get("documents"):
        parts.append(
            "<p class='fail'>The validation split shares documents with train: its loss is optimistic.</p>"
        )
        parts.append(
            table(
                ["validation document", "train document"],
                [list(p) for p in a.duplicate_snippets],
                left=(0, 1),
            )
        )
    else:
        parts.append("<p class='ok'>No validation document occurs in train.</p>")
    return "".join(parts)


def render(a: Analysis) -> str:
    """The whole page as a string."""
    bodies = {
        "summary": _summary(a),
        "lengths": _lengths(a),
        "tokens": _tokens(a),
        "quality": _quality(a),
        "filtering": _filtering(a),
    }
    subtitle = f"<code>{esc(a.folder)}</code>, split <b>{esc(a.split)}</b>"
    return page(
        f"Prepared data: {a.folder} ({a.split})",
        "Prepared data analysis",
        subtitle,
        [(key, title, bodies[key]) for key, title in SECTIONS],
    )
