"""Render results as a folder: ``report.json``, ``report.md`` and a self-contained ``report.html``
(PNG plots inlined as data URIs, and also written beside it)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from compress.errors import OutputExistsError, param, printable
from compress.filesystem import write_text
from compress.measure import BUSY, layer_table, speed_change
from compress.scoring import METRICS, Metric

if TYPE_CHECKING:
    from compress.search_results import PipelineSummary


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "-" if v is None else str(v)


def _md_cell(v: Any) -> str:
    """A cell's text: a name from a file (a layer's) keeps its '|' and control characters inside the cell."""
    return printable(_fmt(v)).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
.big{font-size:1.4em;margin:.5em 0}.good{color:#17702a}.bad{color:#a4161a}"""


REPORT_FILES = ("report.json", "report.md", "report.html")


def check_folder(folder, force: bool = False) -> Path:
    """Refuse a folder that already holds a report, unless ``force``."""
    folder = Path(folder)
    if not force and any((folder / f).exists() for f in REPORT_FILES):
        raise OutputExistsError(f"{folder} already holds a report; pass {param('force')} to replace it")
    return folder


def prepare_folder(folder, force: bool = False) -> Path:
    """The report folder, created; a report already in it is replaced only with ``force``."""
    folder = check_folder(folder, force)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_folder(
    folder,
    title: str,
    summary: str,
    sections: list[tuple[str, list[str], list[list]]],
    images: list[Path],
    data: dict,
    force: bool = False,
) -> dict[str, Path]:
    """sections: (heading, header, rows). Writes report.json / report.md / report.html."""
    folder = Path(folder)
    md = [f"# {title}", "", summary, ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p class='big'>{html.escape(summary)}</p>"]
    for heading, header, rows in sections:
        md += [f"## {heading}", "", _md_table(header, rows), ""]
        body += [f"<h2>{html.escape(heading)}</h2>", _html_table(header, rows)]
    md += ["## Plots", ""]
    body.append("<h2>Plots</h2>")
    for img in images:
        md.append(f"![{img.stem}]({img.name})")
        b64 = base64.b64encode(img.read_bytes()).decode()
        body.append(
            f"<h3>{html.escape(img.stem.replace('_', ' '))}</h3>"
            f"<img alt='{img.stem}' src='data:image/png;base64,{b64}'>"
        )
    paths = {"json": folder / "report.json", "md": folder / "report.md", "html": folder / "report.html"}
    write_text(paths["json"], json.dumps(data, indent=2, default=str) + "\n", force=True)
    write_text(paths["md"], "\n".join(md) + "\n", force=True)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
    )
    write_text(paths["html"], page, force=True)
    return paths


LABELS = {
    "file_bytes": "file bytes",
    "cpz_bytes": ".cpz bytes (compress encode)",
    "params": "parameters",
    "nonzero_params": "nonzero parameters",
    "dense_fp32_bytes": "dense FP32 bytes",
    "macs": "MACs (multiply-accumulates)",
    "accuracy": "accuracy %",
    "test_accuracy": "test accuracy %",
}


def before_after_rows(before: dict, after: dict) -> list[list]:
    """[label, before, after, change] for the numbers every model-changing command shows."""
    rows = []
    labels = {**LABELS, **score_labels(after)}
    for k in ("params", "nonzero_params", "macs", "file_bytes", "cpz_bytes", "accuracy", "test_accuracy"):
        b, a = before.get(k), after.get(k)
        if b is None and a is None:
            continue
        if b is None or a is None:
            change = "-"
        elif "accuracy" in k:
            change = f"{a - b:+.2f} pt"
        elif a == b:
            change = "same"
        else:
            change = f"{b / a:.2f}x smaller" if a and b >= a else f"{a / max(b, 1):.2f}x larger"
        label = f"{labels[k]} ({after['test_data']})" if k == "test_accuracy" and after.get("test_data") else labels[k]
        rows.append([label, b, a, change])  # every accuracy names its data (the title names the validation data)
    drift = after.get("drift")
    if drift:  # what the change did to the outputs, with data or without
        if drift["top1_agreement"] is not None:
            rows.append(
                [
                    f"top-1 agreement with the input model, {drift['data']} (%)",
                    100.0,
                    drift["top1_agreement"],
                    f"{drift['top1_agreement'] - 100:+.2f} pt",
                ]
            )
        rows.append([f"output change, relative L2 ({drift['data']})", 0.0, round(drift["relative_change"], 4), ""])
    lb, la = before.get("latency_ms", {}), after.get("latency_ms", {})
    for k in ("batch_1", "batch_32"):
        b, a = lb.get(k), la.get(k)
        if b is not None or a is not None:
            busy = lb.get("busy", {}).get(k) or la.get("busy", {}).get(k)
            verdict = speed_change(b, a, la.get("speedup", {}).get(k), busy)
            if after.get("weights_only") and BUSY in verdict:
                verdict = f"same compute (weights only); {BUSY}: the timings are not reliable"
            elif after.get("weights_only") and not verdict.startswith(("same", "too noisy")):
                verdict += " (weights only: the same FP32 compute; timing noise)"
            elif after.get("weights_only"):
                verdict = "same compute (weights only)"
            runs = la.get("runs", {}).get(k)
            what = f"median of {runs:,} interleaved runs" if runs else "median"
            rows.append([f"latency, {k.replace('_', ' ')} (ms, {what})", b, a, verdict])
    return rows


def render_stage_report(
    result: dict, before_model: nn.Module | None, after_model: nn.Module, folder, force: bool = False
) -> dict[str, Path]:
    from compress.report import plots  # (matplotlib: a second on import, so only where a report is written)

    folder = prepare_folder(folder, force)
    b, a = result["before"], result["after"]
    images = []
    if b.get("layers") and a.get("layers"):
        images.append(plots.layer_density(b["layers"], a["layers"], folder / "layers.png"))
    if before_model is not None:
        images.append(plots.weight_histograms(before_model, after_model, folder / "weight_histograms.png"))
    summary = f"{result['method']}: {b['nonzero_params'] / max(a['nonzero_params'], 1):.1f}x fewer nonzero weights"
    if b.get("macs") and a.get("macs"):
        summary += f", {b['macs'] / max(a['macs'], 1):.2f}x fewer MACs"
    if "accuracy" in a:
        label = a.get("metric") or LABELS["accuracy"]
        summary += f", {score_change(b['accuracy'], a['accuracy'], label)} ({a['accuracy'] - b['accuracy']:+.2f} pt)"
    sections = [("Before / after", ["", "before", "after", "change"], before_after_rows(b, a))]
    if a.get("layers"):
        sections.append(
            (
                "Layers after",
                ["layer", "type", "parameters", "nonzeros", "MACs"],
                [[r["name"], r["type"], r["params"], r["nonzeros"], r["macs"]] for r in a["layers"]],
            )
        )
    return write_folder(folder, f"compress report: {result['method']}", summary, sections, images, result, force)


def metric_label(metric) -> str:
    """The label of the metric scores were measured by: a ``scoring.Metric`` (its ``label``), or the name a
    summary keeps ("top1", "top5", the user's function's name, "evaluate" for the user's own evaluation)."""
    if isinstance(metric, Metric):
        return metric.label
    if metric is None or metric in METRICS:
        return METRICS[metric or "top1"].label
    return "score (evaluate)" if metric == "evaluate" else str(metric)


def score_text(value: float, label: str) -> str:
    """A score as its metric names it: "accuracy 72.22%" (a label in %), "my_metric 0.7222" (any other)."""
    if label.endswith(" %"):
        return f"{label.removesuffix(' %')} {value:.2f}%"
    return f"{label} {value:.4g}"


def score_change(before: float, after: float, label: str) -> str:
    """A score before and after, named once by its metric: "accuracy 85.80% -> 86.00%", "my_metric 0.7 -> 0.72"."""
    return f"{score_text(before, label)} -> {score_text(after, label).rpartition(' ')[2]}"


def score_labels(rep: dict) -> dict[str, str]:
    """The rows' labels of a score that is not top-1 accuracy (``rep["metric"]``: the metric's label)."""
    m = rep.get("metric")
    return {"accuracy": m, "test_accuracy": f"test {m}"} if m and m != LABELS["accuracy"] else {}


def model_rows(rep: dict) -> list[list]:
    """[label, value] rows of one model's numbers (the terminal table and the HTML report)."""
    labels = {**LABELS, **score_labels(rep)}
    rows = [
        [labels[k], rep[k]]
        for k in ("file_bytes", "params", "nonzero_params", "dense_fp32_bytes", "macs", "accuracy", "test_accuracy")
        if rep.get(k) is not None
    ]
    for row in rows:  # every accuracy names its data
        if row[0] == labels["accuracy"] and rep.get("accuracy_data"):
            row[0] = f"{labels['accuracy']} ({rep['accuracy_data']})"
        if row[0] == labels["test_accuracy"] and rep.get("test_data"):
            row[0] = f"{labels['test_accuracy']} ({rep['test_data']})"
    if rep.get("heldout_accuracy") is not None:
        rows.append([f"{labels['accuracy']} ({rep['heldout_data']})", rep["heldout_accuracy"]])
    if rep.get("ratio_vs_dense_fp32"):
        rows.insert(1, ["smaller than dense FP32", f"{rep['ratio_vs_dense_fp32']:.2f}x"])
    if rep.get("input_shape"):
        rows.append(["input shape", "x".join(map(str, rep["input_shape"]))])
    if rep.get("int8"):
        rows.append(
            [
                "executes",
                f"{rep['int8']['executes']}; {rep['int8']['observer']} activation ranges from "
                f"{rep['int8']['calibration']}",
            ]
        )
    lat = rep.get("latency_ms", {})
    for k in ("batch_1", "batch_32"):
        if k in lat:  # the median and the quartiles of the same runs (metrics.run_stats): it lies within them
            iqr, runs, busy = (lat.get(f, {}).get(k) for f in ("iqr", "runs", "busy"))
            what = f"median of {runs:,} runs" if runs else "median"
            text = f"{lat[k]:.3f}" + (f" (IQR {iqr[0]:.3f}-{iqr[1]:.3f})" if iqr else "")
            if busy:
                text += f"; {BUSY} ({busy}): not reliable"
            rows.append([f"latency, {k.replace('_', ' ')} (ms, {what}{'; IQR of the same runs' if iqr else ''})", text])
    return rows


def render_model_report(rep: dict, folder, force: bool = False) -> dict[str, Path]:
    from compress.report import plots

    folder = prepare_folder(folder, force)
    images = [plots.layer_density(rep["layers"], None, folder / "layers.png")] if rep.get("layers") else []
    summary = (
        f"{rep['file']}: {rep['file_bytes']:,} bytes, "
        f"{rep.get('ratio_vs_dense_fp32') or 1:.2f}x smaller than its dense FP32 weights"
    )
    sections = [("Model", ["", "value"], model_rows(rep))]
    if rep.get("layers") and "nodes" in rep["layers"][0]:
        title, header, rows = graph_layer_rows(rep["layers"])
        sections.append((title.capitalize(), header, rows))
    elif rep.get("layers"):
        sections.append(
            (
                "Layers",
                ["layer", "type", "parameters", "nonzeros", "MACs", "bits"],
                [[r["name"], r["type"], r["params"], r["nonzeros"], r["macs"], r.get("bits")] for r in rep["layers"]],
            )
        )
    return write_folder(folder, "compress report", summary, sections, images, rep, force)


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def graph_layer_rows(layers: list[dict]) -> tuple[str, list[str], list[list]]:
    """(title, header, rows) of the layer table of a model decoded from its stored graph (``GraphModel.layer_table``:
    rows with ``nodes``): a group of its nodes a row, with their op kinds."""
    return (
        "layers: the stored graph's nodes, a row from each conv2d / linear / attention node to the next",
        ["layer", "ops", "nodes", "parameters", "nonzeros", "MACs", "output", "bits"],
        [
            [
                r["name"],
                r["type"],
                _span(*r["nodes"]),
                r["params"],
                r["nonzeros"],
                r["macs"],
                "x".join(map(str, r["output_shape"])),
                r.get("bits"),
            ]
            for r in layers
        ],
    )


def value_text(v) -> str:
    """A searched value for people: 0.93, "conv 6, linear 4", or "bits (conv 6, linear 4), rd_lambda 0.1"."""
    if isinstance(v, dict):
        return ", ".join(f"{k} ({value_text(x)})" if isinstance(x, dict) else f"{k} {x}" for k, x in v.items())
    return "-" if v is None else str(v)


def render_pipeline_report(
    summary: PipelineSummary, before_model: nn.Module, after_model: nn.Module, input_shape, folder, force: bool = False
) -> dict[str, Path]:
    from compress.report import plots

    folder = prepare_folder(folder, force)
    label = metric_label(summary.metric)  # every score named by the metric it was measured with
    lb, la = layer_table(before_model, input_shape), layer_table(after_model, input_shape)
    points = [
        {"label": "dense", "stage": "uncompressed", "bytes": summary.dense_bytes, "accuracy": summary.base_accuracy}
    ]
    for s in summary.stages:
        for c in s.tried:
            points.append(
                {
                    "label": value_text(c.value),
                    "stage": s.stage,
                    "bytes": c.bytes,
                    "accuracy": c.accuracy,
                    "kept": c.verdict.startswith("kept"),
                }
            )
    images = [
        plots.bytes_per_stage(summary.timeline, folder / "bytes_per_stage.png"),
        plots.accuracy_vs_size(
            points, folder / "accuracy_vs_size.png", summary.base_accuracy, summary.budget_pt, label
        ),
        plots.layer_density(lb, la, folder / "layers.png"),
        plots.weight_histograms(before_model, after_model, folder / "weight_histograms.png"),
    ]
    text = (
        f"{summary.ratio:.1f}x smaller than the dense FP32 weights ({summary.dense_bytes:,} -> "
        f"{summary.cpz_bytes:,} bytes); validation "
        f"{score_change(summary.base_accuracy, summary.final_accuracy, label)} (budget {summary.budget_pt} pt)"
    )
    if summary.candidate_bytes_error:
        text += (
            f"; each candidate's bytes are its own .cpz, measured when tried: the file written differs from the "
            f"last one kept by {summary.candidate_bytes_error:+,} bytes (the pipeline's history entry)"
        )
    if summary.test_accuracy_before is not None and summary.test_accuracy_after is not None:
        text += f"; test {score_change(summary.test_accuracy_before, summary.test_accuracy_after, label)}"
    test = "test_accuracy" in summary.timeline[0]
    bits = {r["name"]: r.get("bits") for r in la}
    layer_bytes = summary.layer_bytes  # measured by the pipeline's own final encode
    sections = [
        (
            "Stage by stage",
            [
                "stage",
                "bytes",
                "ratio vs dense",
                "nonzeros",
                "MACs",
                "latency batch 1 (ms, median)",
                f"validation {label}",
            ]
            + ([f"test {label}"] if test else []),
            [
                [
                    t["stage"],
                    t["bytes"],
                    f"{summary.dense_bytes / t['bytes']:.1f}x",
                    t["nonzeros"],
                    t.get("macs"),
                    t.get("latency_ms"),
                    t["accuracy"],
                ]
                + ([t.get("test_accuracy")] if test else [])
                for t in summary.timeline
            ],
        ),
        (
            "What each stage kept",
            ["stage", "searched", "kept", "candidates tried", "seconds"],
            [
                [
                    s.stage,
                    s.search_key,
                    value_text(s.kept.value) if s.kept else "nothing (all over budget)",
                    len(s.tried),
                    s.seconds,
                ]
                for s in summary.stages
            ],
        ),
        (
            "Every candidate, and why it was kept or not",
            ["stage", "value", "bytes (its .cpz)", label, "drop (pt)", "verdict"],
            [
                [s.stage, value_text(c.value), c.bytes, c.accuracy, f"{c.drop:+.2f} ± {c.se:.2f}", c.verdict]
                for s in summary.stages
                for c in s.tried
            ],
        ),
        (
            "Layers",
            ["layer", "parameters", "nonzeros", "density %", "bits", "bytes in the .cpz"],
            [
                [
                    r["name"],
                    r["params"],
                    r["nonzeros"],
                    100 * r["nonzeros"] / max(r["params"], 1),
                    bits.get(r["name"]),
                    layer_bytes.get(r["name"]),
                ]
                for r in la
            ],
        ),
    ]
    return write_folder(folder, "compress pipeline report", text, sections, images, summary.to_dict(), force)
