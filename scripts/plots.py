#!/usr/bin/env python3
"""Draws the figures of BENCHMARKS.md from a load test's own output.

    bash scripts/loadtest.sh          # writes target/loadtest/results.tsv and -batches.tsv
    python3 scripts/plots.py          # writes docs/img/*.svg from them

    python3 scripts/plots.py RESULTS.tsv BATCHES.tsv OUT_DIR

Plain SVG, written by hand: no plotting library to install. Three figures:
- scenarios.svg: each scenario's throughput as a share of the bare hyper + rustls responder
  serving a body of the same size in the same run, and its p99 latency beside the bare one;
- workers.svg: the JWT read with 1, 2 and 4 worker processes;
- audit-batches.svg: records per group commit against audit records written per second, as
  concurrency grows.
"""

import csv
import math
import os
import sys
from html import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The scenarios the report shows, in order, with their labels.
SCENARIOS = [
    ("apiStatus", "GET /apiStatus (public)"),
    ("jwt-read-limiter-on", "payment read, JWT"),
    ("opaque-read-limiter-on", "payment read, opaque token"),
    ("basic-read-limiter-on", "payment read, Basic (Argon2id)"),
    ("jwt-read-4x-connections", "payment read, JWT, 4x connections"),
    ("create-payment", "payment creation, JWT"),
    ("flood-rejected", "flood refused with 429"),
]
WORKERS = [
    ("jwt-read-workers-1", "1 worker"),
    ("jwt-read-workers-2", "2 workers"),
    ("jwt-read-workers-4", "4 workers"),
    ("jwt-read-workers-1-multithread", "1 worker, 2 threads"),
    ("jwt-read-workers-2-multithread", "2 workers, 2 threads each"),
]
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'
PAYGATE, BARE, GRID, TEXT = "#2f6db3", "#b9c4d0", "#e3e7eb", "#222"


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def svg(width, height, body, title):
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {FONT} font-size="12">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>\n'
        f'<text x="12" y="22" font-size="15" font-weight="bold" fill="{TEXT}">{escape(title)}</text>\n'
        + "\n".join(body)
        + "\n</svg>\n"
    )


def text(x, y, s, anchor="start", size=12, color=TEXT, weight="normal"):
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
        f'fill="{color}" font-weight="{weight}">{escape(s)}</text>'
    )


def rect(x, y, w, h, color):
    return f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{h:.1f}" fill="{color}"/>'


def line(x1, y1, x2, y2, color=GRID, width=1):
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" stroke-width="{width}"/>'


def scenarios_figure(rows):
    by_name = {r["scenario"]: r for r in rows}
    shown = [(n, label) for n, label in SCENARIOS if n in by_name]
    label_w, panel_w, gap, row_h, top = 250, 300, 40, 30, 70
    width = label_w + 2 * panel_w + gap + 90
    height = top + row_h * len(shown) + 40
    left1, left2 = label_w, label_w + panel_w + gap
    body = [
        text(left1, 48, "requests/s as a share of bare (same body size)", weight="bold"),
        text(left2, 48, "p99 latency, ms, log scale (grey: bare)", weight="bold"),
    ]
    # p99 on a log scale: Argon2id's hundreds of milliseconds and a cached read's one.
    p99s = [float(by_name[n]["p99_ms"]) for n, _ in shown] + [
        float(by_name[by_name[n]["bare"]]["p99_ms"]) for n, _ in shown
    ]
    lo = 10 ** math.floor(math.log10(max(min(p99s), 0.01)))
    hi = 10 ** math.ceil(math.log10(max(p99s)))
    decades = max(round(math.log10(hi / lo)), 1)

    def p99_x(v):
        return left2 + panel_w * math.log10(max(v, lo) / lo) / decades

    for i in range(0, 11, 2):
        x = left1 + panel_w * i / 10
        body += [line(x, top - 8, x, top + row_h * len(shown)), text(x, top + row_h * len(shown) + 16, f"{i / 10:.1f}", "middle", 10)]
    for i in range(decades + 1):
        v = lo * 10**i
        x = p99_x(v)
        body += [line(x, top - 8, x, top + row_h * len(shown)), text(x, top + row_h * len(shown) + 16, f"{v:g}", "middle", 10)]
    for i, (name, label) in enumerate(shown):
        row = by_name[name]
        bare = by_name[row["bare"]]
        y = top + i * row_h
        share = float(row["rps"]) / float(bare["rps"])
        body.append(text(left1 - 8, y + 15, label, "end"))
        body.append(rect(left1, y, panel_w * min(share, 1.0), row_h - 10, PAYGATE))
        body.append(text(left1 + panel_w * min(share, 1.0) + 4, y + 14, f"{share:.2f}  ({float(row['rps']):,.0f}/s)" if share >= 0.01 else f"{share:.4f}  ({float(row['rps']):,.0f}/s)", size=11))
        p99, bare_p99 = float(row["p99_ms"]), float(bare["p99_ms"])
        body.append(rect(left2, y, p99_x(bare_p99) - left2, (row_h - 10) / 2, BARE))
        body.append(rect(left2, y + (row_h - 10) / 2, p99_x(p99) - left2, (row_h - 10) / 2, PAYGATE))
        body.append(text(p99_x(max(p99, bare_p99)) + 4, y + 14, f"{p99:g} ms", size=11))
    return svg(width, height, body, "paygate against a bare hyper + rustls responder, one run")


def workers_figure(rows):
    by_name = {r["scenario"]: r for r in rows}
    shown = [(n, label) for n, label in WORKERS if n in by_name]
    label_w, panel_w, row_h, top = 190, 420, 30, 50
    width, height = label_w + panel_w + 120, top + row_h * len(shown) + 40
    top_rps = max(float(by_name[n]["rps"]) for n, _ in shown)
    base = float(by_name[shown[0][0]]["rps"])
    body = []
    for i in range(5):
        x = label_w + panel_w * i / 4
        body += [line(x, top - 8, x, top + row_h * len(shown)), text(x, top + row_h * len(shown) + 16, f"{top_rps * i / 4:,.0f}", "middle", 10)]
    for i, (name, label) in enumerate(shown):
        rps = float(by_name[name]["rps"])
        y = top + i * row_h
        body.append(text(label_w - 8, y + 15, label, "end"))
        body.append(rect(label_w, y, panel_w * rps / top_rps, row_h - 10, PAYGATE))
        body.append(text(label_w + panel_w * rps / top_rps + 4, y + 14, f"{rps:,.0f}/s ({rps / base:.2f}x)", size=11))
    return svg(width, height, body, "JWT payment read by worker processes (requests/s)")


def batches_figure(batches):
    points = []
    for b in batches:
        records, commits, seconds = int(b["records"]), int(b["commits"]), float(b["seconds"])
        if commits > 0 and seconds > 0:
            points.append((int(b["connections"]), records / seconds, records / commits))
    left, top, w, h = 70, 50, 460, 260
    width, height = left + w + 110, top + h + 60
    body = [
        text(left + w / 2, top + h + 42, "audit records written per second", "middle"),
        f'<text x="18" y="{top + h / 2:.1f}" text-anchor="middle" transform="rotate(-90 18 {top + h / 2:.1f})" fill="{TEXT}">records per commit (one fdatasync each)</text>',
    ]
    if not points:
        return svg(width, height, body + [text(left, top + 20, "no audit commits in this run")], "Audit group commit")
    x_max = max(p[1] for p in points) * 1.1
    y_max = max(p[2] for p in points) * 1.15
    for i in range(5):
        x = left + w * i / 4
        y = top + h - h * i / 4
        body += [
            line(x, top, x, top + h), text(x, top + h + 16, f"{x_max * i / 4:,.0f}", "middle", 10),
            line(left, y, left + w, y), text(left - 6, y + 4, f"{y_max * i / 4:.1f}", "end", 10),
        ]
    coords = [(left + w * rate / x_max, top + h - h * per / y_max, c, per) for c, rate, per in points]
    body.append(
        '<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>'
        % (PAYGATE, " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in coords))
    )
    for x, y, c, per in coords:
        body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{PAYGATE}"/>')
        body.append(text(x + 6, y - 6, f"{c} conn.: {per:.1f}", size=11))
    return svg(width, height, body, "Audit group commit: batch size grows with concurrency")


def main():
    out_dir = os.path.join(ROOT, "docs", "img")
    results = os.path.join(ROOT, "target", "loadtest", "results.tsv")
    batches = os.path.join(ROOT, "target", "loadtest", "results-batches.tsv")
    if len(sys.argv) == 4:
        results, batches, out_dir = sys.argv[1:]
    elif len(sys.argv) != 1:
        sys.exit(__doc__)
    rows = read_tsv(results)
    os.makedirs(out_dir, exist_ok=True)
    figures = {
        "scenarios.svg": scenarios_figure(rows),
        "workers.svg": workers_figure(rows),
        "audit-batches.svg": batches_figure(read_tsv(batches)),
    }
    for name, content in figures.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(content)
        print(os.path.join(out_dir, name))


if __name__ == "__main__":
    main()
