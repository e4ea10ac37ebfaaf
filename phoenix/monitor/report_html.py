"""The run report's page: ``index.html`` from the data of ``report.json``.

One file with its own style sheet and no script; figures are ``<img>`` of the PNG files
beside it, so the folder can be copied, attached or served by any static file server.
Every text from the runs (names, paths, dataset names) is HTML-escaped.
"""

from __future__ import annotations

from html import escape

from phoenix.config.skip import merged_ranges

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.note { color: #666; font-size: 0.9em; } code { font-size: 0.95em; }
code.cmd { color: #555; font-size: 0.85em; }
"""

SECTIONS = [
    ("Loss", ("loss.png", "dataset_loss.png"),
     "Left: by optimizer step; right: by consumed tokens. Triangles: spikes (spikes.jsonl); "
     "grey: batches train.skip_batches skipped (no loss logged there)."),
    ("Learning rate", ("lr.png",), "Solid vertical lines: stage boundaries (the run's config.yaml)."),
    ("Gradient norm", ("grad_norm.png",), ""),
]


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "&ndash;"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return escape(str(x))


def _figure(plot: dict) -> str:
    return (f'<figure><img src="{escape(plot["png"])}" alt="{escape(plot["title"])}">'
            "</figure>")


def _runs_table(report: dict) -> str:
    rows = ["<tr><th>run</th><th>folder</th><th>stages</th><th>spikes</th>"
            "<th>skipped batches</th></tr>"]
    for r in report["runs"]:
        stages = ", ".join(f"{escape(s['name'])} from step {s['first_step']}" for s in r["stages"])
        skipped = ", ".join(f"{a}" if a == b else f"{a}&ndash;{b}"
                            for a, b in merged_ranges(r["skipped"]))
        rows.append(f"<tr><td>{escape(r['label'])}</td><td><code>{escape(r['path'])}</code></td>"
                    f"<td>{stages or '&ndash;'}</td><td class=num>{len(r['spikes'])}</td>"
                    f"<td>{skipped or '&ndash;'}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _spike_table(report: dict) -> str:
    head = ("<tr><th>run</th><th>step</th><th>loss</th><th>grad norm</th><th>flagged</th>"
            "<th>skipped</th><th>top samples (dataset / sample / document / group: loss, "
            "tokens)</th><th>top layers (grad norm)</th></tr>")
    rows = []
    for i, run in enumerate(report["runs"]):
        for r in run["spikes"]:
            flagged = "<br>".join(
                f"{escape(k)} {_num(v.get('value'))} &gt; {_num(v.get('threshold'))}"
                for k, v in (r.get("spikes") or {}).items())
            samples = "<br>".join(
                f"<code>{escape(str(s.get('dataset')))}</code> / {s.get('sample_id')} / "
                f"{s.get('document_id')} / {s.get('group_id')}: {_num(s.get('loss'))}, "
                f"{s.get('tokens')}" for s in r.get("top_samples") or [])
            layers = ("<br>".join(f"{escape(l['name'])} {_num(l.get('grad_norm'))}"
                                  for l in r["top_layers"]) if r.get("top_layers")
                      else escape(r.get("top_layers_note") or ""))
            # The batch's documents: phoenix inspect-batch RUN STEP prints their text.
            inspect = f"phoenix inspect-batch {run['path']} {r['step']}"
            rows.append(f"<tr id=\"spike-{i}-{r['step']}\">"
                        f"<td>{escape(run['label'])}</td><td class=num>{r['step']}</td>"
                        f"<td class=num>{_num(r.get('loss'))}</td>"
                        f"<td class=num>{_num(r.get('grad_norm'))}</td><td>{flagged}</td>"
                        f"<td>{'yes' if r.get('skipped') else 'no'}</td><td>{samples}"
                        f"<br><code class=cmd>{escape(inspect)}</code></td>"
                        f"<td>{layers}</td></tr>")
    if not rows:
        return '<p class="note">No spike was recorded (no spikes.jsonl, or no step spiked).</p>'
    return "<table>" + head + "".join(rows) + "</table>"


def page(report: dict) -> str:
    plots = {p["png"]: p for p in report["plots"]}
    title = "Phoenix run report: " + ", ".join(r["label"] for r in report["runs"])
    body = [f"<h1>{escape(title)}</h1>", _runs_table(report)]
    for heading, pngs, note in SECTIONS:
        found = [plots[p] for p in pngs if p in plots]
        if found:
            body.append(f"<h2>{heading}</h2>")
            if note:
                body.append(f'<p class="note">{escape(note)}</p>')
            body += [_figure(p) for p in found]
    body += ["<h2>Spikes</h2>", _spike_table(report)]
    # By family, runs side by side within one: the runs' grad norms follow each other.
    heatmaps = sorted((p for p in report["plots"] if p["kind"] == "heatmap"
                       and not p["family"].startswith("moe/")), key=lambda p: p["family"])
    if heatmaps:
        body.append("<h2>Per-layer norms</h2>")
        body.append('<p class="note">Layer x step, layer 0 (next to the embedding) on top; '
                    "colour on a log10 scale for norms and ratios; triangles: spike steps.</p>")
        body += [_figure(p) for p in heatmaps]
    moe = [p for p in report["plots"] if p["png"].startswith("moe_")
           or (p["kind"] == "heatmap" and p["family"].startswith("moe/"))]
    if moe:
        body.append("<h2>MoE routing</h2>")
        body += [_figure(p) for p in moe]
    shown = {p for _, pngs, _ in SECTIONS for p in pngs} | {p["png"] for p in heatmaps + moe}
    rest = [p for p in report["plots"] if p["png"] not in shown]
    if rest:  # a figure no section claims is still on the page
        body.append("<h2>Other</h2>")
        body += [_figure(p) for p in rest]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
