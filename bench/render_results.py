"""Render docs/results.md from a pytest-benchmark JSON file: `python bench/render_results.py F OUT`.

`python bench/render_results.py F OUT --update`: F is a partial run (some bench files, e.g. `make bench-int8`);
its sections replace those of OUT with the same heading (and the headings in RETIRED, sections this renderer no
longer writes), each marked with the run's date; OUT's other sections stay as they were, from their own run."""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone


def fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


# published whole-model ratios on MNIST (LeNet-5, LeNet-300-100) and how each was counted
ANCHORS = [
    ("Deep Compression (Han et al. 2016)", "39x", "40x", "computed bits, Han's storage format"),
    ("Dynamic Network Surgery (Guo et al. 2016)", "108x", "56x", "parameter counts"),
    ("Soft weight-sharing (Ullrich et al. 2017)", "162x", "64x", "computed bits, Han's storage format"),
    ("Sparse variational dropout (Molchanov et al. 2017)", "280x", "68x", "nonzero weights"),
    ("Bayesian Compression (Louizos et al. 2017)", "419x", "-", "computed bits"),
    ("DeepCABAC (Wiedemann et al. 2019)", "115x", "-", "a real bitstream, sparsely trained LeNet-5"),
]


def anchors(by_name: dict) -> list[str]:
    ours = {m: by_name.get(f"test_pipeline_deep_compression[{m}]") for m in ("lenet5", "lenet300")}
    if not all(ours.values()):
        return []
    out = [
        "",
        "## Anchors: published ratios beside this run",
        "",
        "compress counts the real bytes of the file it writes (architecture, indices, codebooks, biases, "
        "checksums); most papers count computed bits of the weights or parameters. Their base models "
        "were trained on all 60,000 MNIST digits; ours on 4,000.",
        "",
        "| method | LeNet-5 | LeNet-300-100 | counted as |",
        "|---|---|---|---|",
        f"| **compress pipeline (this run)** | **{fmt(ours['lenet5']['compression_ratio'], 1)}x** "
        f"({fmt(ours['lenet5']['accuracy_drop'])} pt) | **{fmt(ours['lenet300']['compression_ratio'], 1)}x** "
        f"({fmt(ours['lenet300']['accuracy_drop'])} pt) | file bytes, test-set drop |",
    ]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in ANCHORS]
    return out


def nncodec(by_name: dict) -> list[str]:
    """The .cpz beside NNCodec at equal test accuracy (bench/nncodec_side.py, test_nncodec_peer)."""
    rows, ratios, runs, notes = [], [], set(), []
    names = {"lenet5": "LeNet-5", "lenet300": "LeNet-300-100", "resnet20": "ResNet-20"}
    accept = {"lenet5": 0.8, "lenet300": 0.8, "resnet20": 0.9}
    for model in ("lenet5", "lenet300", "resnet20"):
        e = by_name.get(f"test_nncodec_peer[{model}]", {}).get("side")
        if not e:
            continue
        runs.add(f"{e.get('date', '?')} on {e.get('machine', '?')}")
        q = [o for r in e["cpz"] for o in (r.get("kept") or []) if o and "rd_lambda" in o]
        bits = q[0]["bits"] if q else None
        bits = ", ".join(f"{k} {v}" for k, v in bits.items()) if isinstance(bits, dict) else bits
        kept = f" (kept: bits {bits}, rd_lambda {q[0]['rd_lambda']})" if q else ""
        rd = f", with RD quantization {e['pipeline_rd_s']:,.0f} s{kept}" if "pipeline_rd_s" in e else ""
        notes.append(f"{names[model]}: the pipeline {e.get('pipeline_s', 0):,.0f} s{rd}")
        for r in e["cpz"]:
            rows.append(
                f"| {names[model]} | {r['row']} | {r['bytes']:,} | {r['tensor_bytes']:,} | {fmt(r['accuracy'])} | "
                f"{r['encode_s']:.3f} | {r['decode_s']:.3f} |"
            )
        for r in e["nncodec"]:
            rows.append(
                f"| {names[model]} | {r['row']} | {r['bytes']:,} | {r['bytes']:,} | {fmt(r['accuracy'])} | "
                f"{r['encode_s']:.3f} | {r['decode_s']:.3f} |"
            )
        for m in e["match"]:
            if m.get("qp") is None:
                ratios.append(f"| {names[model]} | {m['row']} | none as accurate | - | - | <= {accept[model]}x |")
                continue
            ok = "yes" if m["ratio"] <= accept[model] else "no"
            ratios.append(
                f"| {names[model]} | {m['row']} | qp {m['qp']}, {m['nncodec_bytes']:,} | {m['ratio']:.3f}x | "
                f"{m['tensor_ratio']:.3f}x | <= {accept[model]}x: {ok} |"
            )
    if not rows:
        return []
    return [
        "",
        "## NNCodec beside .cpz, on the same weights",
        "",
        "NNCodec 2.1.3 (Fraunhofer HHI's MPEG NNR / DeepCABAC; `make nncodec-env`, `NNCODEC_PYTHON`) re-quantizes "
        "and codes, at each qp, the weights of the default pipeline's .cpz (pruned and k-means quantized; no "
        "fine-tuning after NNCodec). The .cpz rows: the default pipeline (Huffman), the same pipeline with "
        "rate-distortion quantization (`rd_lambda` 0, 0.03, 0.1 beside `bits`), and, when the container has it, "
        "its context-adaptive coder. Bytes are whole files; NNCodec's bitstream holds no architecture, the .cpz "
        "does, so its tensor sections alone are given too. Accuracy: the decoded model on the bench's test set; "
        "seconds: one encode and one decode of the weights (bench/nncodec_side.py). Measured "
        + "; ".join(sorted(runs))
        + ".",
        "",
        "| model | coder | bytes | tensor bytes | test acc % | encode s | decode s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Equal or better accuracy: for each .cpz, the smallest NNCodec bitstream whose accuracy is at least the "
        ".cpz's, and the byte ratio .cpz / NNCodec (issue 35's acceptance: <= 0.8x for the LeNets, <= 0.9x for "
        "ResNet-20).",
        "",
        "| model | .cpz | NNCodec at >= its accuracy | ratio (whole file) | ratio (tensor sections) | acceptance |",
        "|---|---|---|---|---|---|",
        *ratios,
        "",
        "Pipeline wall seconds (pruning search and fine-tuning included, on the shared CPUs): "
        + "; ".join(notes)
        + ".",
        "",
    ]


def matrix(by_name: dict) -> list[str]:
    rows = (by_name.get("test_real_architecture_matrix") or {}).get("matrix")
    if not rows:
        return []
    out = [
        "",
        "## Real architectures (bench/test_bench_real.py)",
        "",
        "Models nobody here wrote (pytorchcv; ConvNeXt in torchvision's CNBlock layout, tests/archs.py), random "
        "weights: structure, MACs and bytes do not depend on them. l1-filter at ratio 0.5 without fine-tuning "
        "beside torch-pruning 1.6's own MetaPruner (L1 magnitude, same ratio); then 4-bit k-means and the .cpz "
        "with the model's graph (compress's own schema, docs/format.md), decoded without the model's code: the "
        "whole .cpz decode in seconds (graph checked and its cost totalled on the meta device included), and the "
        "largest output difference, relative to the largest output.",
        "",
        "| family | exercises | params | MACs | l1-filter 0.5: fewer MACs | torch-pruning | groups kept "
        "(unsafe) | prune s | .cpz bytes (4-bit) | of which graph | vs FP32 | decode s | graph decode rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tp = f"{r['tp_macs_ratio']}x" if isinstance(r["tp_macs_ratio"], (int, float)) else r["tp_macs_ratio"]
        out.append(
            f"| {r['family']} | {r['exercises']} | {r['params']:,} | {r['macs']:,} | {r['l1_macs_ratio']}x | "
            f"{tp} | {r['kept_groups']} | {r['prune_s']} | {r['cpz_bytes']:,} | {r['graph_bytes']:,} | "
            f"{r['ratio_vs_dense']}x | {r.get('decode_s', '-')} | {r['graph_decode_rel_diff']:.1g} |"
        )
    return out


def graph_decode(by_name: dict) -> list[str]:
    rows = (by_name.get("test_graph_decode_is_linear_in_its_nodes") or {}).get("graph_decode")
    if not rows:
        return []
    return [
        "",
        "## Graph decoding is linear (bench/test_bench_graph.py)",
        "",
        "A stored graph of residual units (conv, relu, add; each unit its own weights) at 1x, 10x and 100x "
        "its depth, decoded: parsed into compress's typed objects, run on the meta device to total its "
        "memory and work (by each op's formula, for one sample), and built into a module.",
        "",
        "| scale | nodes | decode s | us per node |",
        "|---|---|---|---|",
    ] + [f"| {r['scale']}x | {r['nodes']:,} | {r['decode_s']} | {r['us_per_node']} |" for r in rows]


def user_data(by_name: dict) -> list[str]:
    """The data users have (bench/test_bench_data.py): folder vs memory, memory on 100,000 images, loader
    speed, distillation."""
    out = []
    same = by_name.get("test_pipeline_folder_same_as_memory")
    if same:
        out += [
            "",
            "## The data users have (bench/test_bench_data.py)",
            "",
            "A short Deep Compression recipe (threshold 0.7/0.8/0.9 with 4 epochs each, then k-means) on LeNet-5, "
            "0.5 pt budget, with mnist5k in memory and with the same 5,000 digits "
            "written as a PNG folder (`folder:DIR`), test accuracy on " + same.get("eval_data", "?") + ":",
            "",
            "| data | ratio | .cpz bytes | validation acc % | test acc % | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for k in ("memory", "folder"):
            r = same[k]
            out.append(
                f"| {k} | {fmt(r['ratio'])}x | {r['cpz_bytes']:,} | {fmt(r['val_accuracy'])} | "
                f"{fmt(r['test_accuracy'])} | {r['seconds']} |"
            )
    mem = by_name.get("test_folder_memory_is_bounded")
    if mem:
        out += [
            "",
            "Peak RSS (the process and its loader processes) of `compress report --data folder:DIR?workers=2` "
            "and a 1-epoch `compress prune --train-data folder:DIR?workers=2` (LeNet-300-100, 28x28 PNGs):",
            "",
            "| images | report MiB | report s | prune MiB | prune s |",
            "|---|---|---|---|---|",
        ]
        for n, r in sorted(mem["images"].items(), key=lambda kv: int(kv[0])):
            out.append(f"| {int(n):,} | {r['report_mb']} | {r['report_s']} | {r['prune_mb']} | {r['prune_s']} |")
    speed = by_name.get("test_folder_loader_keeps_up")
    if speed:
        out += [
            "",
            f"One fine-tuning epoch of ResNet-20 on {speed['samples']:,} 32x32 digits: "
            f"{speed['seconds']['memory']} s in memory, {speed['seconds']['folder']} s from a PNG folder with "
            f"2 loader processes ({speed['folder_over_memory']}x).",
        ]
    rows = [(m, by_name.get(f"test_distillation_at_fixed_compression[{m}]")) for m in ("lenet5", "resnet20")]
    rows = [(m, e) for m, e in rows if e]
    if rows:
        out += [
            "",
            "### Distillation",
            "",
            "L1-filter pruning at ratio 0.5 with 3 epochs of fine-tuning, from the same trained model, with the "
            "task loss alone and with distillation from the input model (`--distill 4`, half the loss); "
            "test accuracy, mean (min-max) over seeds of the fine-tuning order:",
            "",
            "| model | base acc % | task loss | distill T=4 | gain pt | seeds |",
            "|---|---|---|---|---|---|",
        ]
        for m, e in rows:
            d = e["distillation"]
            cell = {k: f"{fmt(v['mean'])} ({fmt(v['min'])}-{fmt(v['max'])})" for k, v in d.items()}
            out.append(
                f"| {m} | {fmt(e['base_accuracy'])} | {cell['task loss']} | {cell['distill T=4']} | "
                f"{e['gain_pt']:+.2f} | {len(d['task loss']['runs'])} |"
            )
        clear = [m for m, e in rows if e["distillation"]["distill T=4"]["min"] > e["distillation"]["task loss"]["max"]]
        out += [
            "",
            f"Distillation gained beyond the seed spread on: {', '.join(clear)}."
            if clear
            else "No gain beyond the seed spread: distillation stays off by default (`--distill T` asks for it).",
        ]
    return out


def kept_section(dst: str, title: str) -> list[str]:
    """A section of the previous ``dst`` (a peer this run could not set up, e.g. NNCodec's environment), kept as it
    was: its heading says which run it is from."""
    import os

    if not os.path.exists(dst):
        return []
    text = open(dst).read()
    start = text.find(title)
    if start < 0:
        return []
    end = text.find("\n## ", start + len(title))
    return [""] + text[start : end if end >= 0 else len(text)].rstrip("\n").split("\n")


def targets(by_name: dict) -> list[str]:
    rows = [e for n, e in by_name.items() if n.startswith("test_target_macs[")]
    if not rows:
        return []
    out = [
        "",
        "## --target-macs (bench/test_bench_targets.py)",
        "",
        "`compress prune --method l1-filter --target-macs 0.5`: channels ranked across layers (L1 over the group's "
        "mean), one threshold by bisection. Beside it, Torch-Pruning 1.6's MetaPruner with global pruning (group "
        "L1 magnitude), its ratio bisected to the same MACs. The trained model gets the same 2 epochs of "
        "fine-tuning after either; accuracy on "
        + next((e["eval_data"] for e in rows if "eval_data" in e), "-")
        + "; pytorchcv models have random weights (where the target lands does not depend on them).",
        "",
        "| model | MACs reached: compress | Torch-Pruning | base acc % | compress acc % (before fine-tuning) | "
        "Torch-Pruning acc % (before) |",
        "|---|---|---|---|---|---|",
    ]
    cu = [e for n, e in by_name.items() if n.startswith("test_channel_union_target_macs[")]
    for e in rows:

        def acc(k, e=e):
            return (
                f"{fmt(e[k + '_accuracy'])} ({fmt(e[k + '_accuracy_before_finetune'])})"
                if k + "_accuracy" in e
                else "-"
            )

        out.append(
            f"| {e['case']} | {e['compress_macs_fraction']:.3f} | {e['torch_pruning_macs_fraction']:.3f} | "
            f"{fmt(e.get('base_accuracy'))} | {acc('compress')} | {acc('torch_pruning')} |"
        )
    lat = by_name.get("test_target_latency")
    if lat:
        out += [
            "",
            f"`--target-latency {lat['target']}` (l1-filter, ResNet-20, batch 1, this machine): the bisection "
            f"measured {lat['bisection_reached']:.3f} of the input's latency; timed again afterwards "
            f"{lat['timed_again'][1]:.3f} (95% interval {lat['timed_again'][0]:.3f}-{lat['timed_again'][2]:.3f}), "
            f"at {lat['macs_fraction']:.3f} of the MACs.",
        ]
    if cu:
        out += [
            "",
            "`compress prune --method channel-union --target-macs 0.5` (4 epochs of group-lasso training, SGD; "
            "the pytorchcv model trains from random weights on 3-channel digits):",
            "",
            "| model | MACs reached | test acc % | what removed it |",
            "|---|---|---|---|",
        ]
        for e in cu:
            how = next((n for n in e["notes"] if n.startswith("the group lasso reached")), "the group lasso alone")
            out.append(f"| {e['case']} | {e['compress_macs_fraction']:.3f} | {fmt(e['accuracy'])} | {how} |")
    return out


def timing(by_name: dict) -> list[str]:
    e = by_name.get("test_same_model_reads_same")
    if not e:
        return []
    return [
        "",
        "## Speed verdicts (bench/test_bench_timing.py)",
        "",
        f'The same LeNet-5 timed against a copy of itself, interleaved, 20 times: "same" in {e["same_of_20"]} of 20 '
        '(the 95% interval of the paired ratio must leave [0.95, 1.05] for "faster" or "slower"); its 8-bit '
        f'weight-quantized copy (the same FP32 compute) against it at batch 32: "{e["int8_weights_vs_fp32"]}".',
    ]


def confidence(by_name: dict) -> list[str]:
    rows = [(n, e) for n, e in by_name.items() if n.startswith("test_budget_misses_on_test_by_confidence")]
    if not rows:
        return []
    out = [
        "",
        "## How sure the budget is (bench/test_bench_confidence.py)",
        "",
        "The issue's case: LeNet-300-100 trained on 4,500 mnist5k digits, the other 500 given as --val-data, "
        "default recipe, 0.5 pt budget, over 5 splits; a miss is a drop of more than 0.5 pt on the official "
        "MNIST test set.",
        "",
        "| trained with | margin | misses | worst test drop pt | mean ratio |",
        "|---|---|---|---|---|",
    ]
    for _, e in sorted(rows, key=lambda kv: -kv[1]["augment"]):
        how = "random shifts (as zoo train)" if e["augment"] else "no augmentation"
        for z, r in e["confidence_study"].items():
            out.append(
                f"| {how} | {float(z):g} SE | {r['misses']} of {r['runs']} | {fmt(r['worst_test_drop'])} | "
                f"{fmt(r['mean_ratio'], 1)}x |"
            )
    return out


def section(title: str, intro: str, columns: list[str], rows: list[list]) -> list[str]:
    """A results section: heading, what was measured, and its table."""
    return ["", f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows
    ]


def extensions(by_name: dict) -> list[str]:
    sch, imp = by_name.get("test_schemes_side_by_side"), by_name.get("test_importances_side_by_side")
    out = []
    if sch:
        out += section(
            "Quantization schemes side by side (bench/test_bench_extensions.py)",
            f"Every registered scheme on the same trained LeNet-5 (base {fmt(sch['base_accuracy'])}% on "
            f"{sch['eval_data']}), every layer, no fine-tuning, biases on 8 bits; SQNR of the weights weighted by "
            "layer size; bytes of the .cpz.",
            ["scheme", "accuracy %", "weight SQNR dB", ".cpz bytes", "ratio"],
            [
                [name, fmt(r["accuracy"]), fmt(r["sqnr_db"]), f"{r['cpz_bytes']:,}", f"{fmt(r['ratio'])}x"]
                for name, r in sch["schemes"].items()
            ],
        )
    if imp:
        out += section(
            "Channel importances side by side (bench/test_bench_extensions.py)",
            f"`l1-filter --target-macs 0.5` on the trained ResNet-20 (base {fmt(imp['base_accuracy'])}% on "
            f"{imp['eval_data']}) by each registered importance; accuracy right after pruning (BatchNorm "
            "statistics no longer fit) and after the same 1 epoch of fine-tuning; one run each.",
            ["importance", "MACs reached", "acc % pruned", "acc % after 1 epoch", "pruning s"],
            [
                [name, f"{r['macs_fraction']:.3f}", fmt(r["accuracy_pruned"]), fmt(r["accuracy"]), fmt(r["seconds"], 1)]
                for name, r in imp["importances"].items()
            ],
        )
    return out


def _kept(st: dict) -> str:
    if st["kept"] is None:
        return f"{st['stage']}: nothing"
    if st["stage"] == "int8":
        return "int8 PTQ" if not st["kept"] else f"int8 QAT {fmt(st['kept'])} epoch(s)"
    return f"{st['stage']} {fmt(st['kept'])}"


def _both(e: dict, get, digits: int = 2) -> str:
    """``get(batch)`` at batch 1 and 32 as "b1 / b32"."""
    return " / ".join(fmt(get(b), digits) for b in ("1", "32"))


def _ratio(r: list | None) -> str:
    return "-" if not r else f"{r[1]:.2f}x ({r[0]:.2f}-{r[2]:.2f})"


def _why(e: dict) -> str:
    """The short form of each profile: batch, and the shares of the kinds of op that took 5% or more."""
    out = []
    for b, w in sorted(e.get("why", {}).items(), key=lambda kv: int(kv[0])):
        shares = ", ".join(f"{k} {v:.0%}" for k, v in w["shares"].items() if v >= 0.05)
        out.append(f"b{b}: {shares}")
    return "; ".join(out) or "-"


def int8(by_name: dict) -> list[str]:
    rows = [e for n, e in by_name.items() if n.startswith("test_int8_in_pytorch[") and "latency" in e]
    out: list[str] = []
    if rows:
        how = rows[0]["timing"]
        lat = lambda e, k: lambda b: e["latency"].get(k, {}).get(b, {}).get("ms")  # noqa: E731
        out += section(
            "INT8 in PyTorch (PT2E) beside ONNX Runtime and OpenVINO (bench/test_bench_int8.py)",
            "compress's INT8 as `compress quantize --activations` makes it by default (engine auto: torchao's PT2E, "
            "compiled by inductor with frozen weights on the first call at each shape; FX where PT2E cannot run; "
            "observer auto; 512 mnist5k digits) beside eager PyTorch FP32, ONNX Runtime INT8 (static QDQ of "
            "compress's ONNX export of the same model, the same digits) and OpenVINO INT8 (that ONNX file as IR). "
            f"Latency on {how['machine']}, {how['threads']} threads, each runtime in a process of its own "
            f"(bench/runtime_worker.py), in {how['rounds']} alternating rounds of {how['round_seconds']} s of calls at "
            "each batch (one runtime running at a time, the order rotated each round): ms is the median of the "
            "rounds' medians, at batch 1 / batch 32; compress INT8 / OpenVINO is the ratio of those medians with "
            "its 95% interval (paired bootstrap over the rounds). Compile: seconds of compress INT8's first call at "
            "batch 1 / 32, in no latency. Where compress INT8 is more than 1.15x OpenVINO's, torch.profiler (CPU) "
            "on the compiled model at that batch: the share of its time by kind of op (notes below).",
            [
                "model",
                "engine",
                "compile s",
                "FP32 ms",
                "compress INT8 ms",
                "ORT INT8 ms",
                "OpenVINO INT8 ms",
                "compress INT8 / OpenVINO, b1",
                "b32",
                "why (profile)",
            ],
            [
                [
                    e["case"],
                    e["engine"],
                    _both(e, lambda b, e=e: e["compile_s"].get(b), 1),
                    _both(e, lat(e, "fp32")),
                    _both(e, lat(e, "int8")),
                    _both(e, lat(e, "ort")),
                    _both(e, lat(e, "ov")),
                    _ratio(e.get("int8_to_openvino", {}).get("1")),
                    _ratio(e.get("int8_to_openvino", {}).get("32")),
                    _why(e),
                ]
                for e in rows
            ],
        )
        notes = [
            f"- {e['case']}, batch {b}: {w['note']}."
            for e in rows
            for b, w in sorted(e.get("why", {}).items(), key=lambda kv: int(kv[0]))
        ]
        notes += [f"- {e['case']}: on FX, {e['engine_note']}." for e in rows if e.get("engine_note")]
        out += [""] + notes if notes else []
        obs = list(rows[0]["int8_accuracy"])
        out += section(
            "INT8 in PyTorch: accuracy by observer (bench/test_bench_int8.py)",
            "Post-training (PTQ): activation ranges from 512 mnist5k digits by each observer; auto tries each on "
            "three quarters of them and keeps the one whose outputs are closest to FP32 on the last quarter (its "
            "choice in brackets: the same model as that column). QAT: 1 epoch of fake-quantized fine-tuning on the "
            "training split, then converted. ONNX Runtime and OpenVINO: the files timed above. Accuracy on "
            f"{rows[0]['eval_data']}; one run each; file: the INT8 .pt against the FP32 .pt.",
            ["model", "engine", "FP32 %"]
            + [f"PTQ {o} %" for o in obs if o != "auto"]
            + ["PTQ auto %", "QAT 1 epoch %", "ORT INT8 %", "OpenVINO INT8 %", "file"],
            [
                [e["case"], e["engine"], fmt(e["fp32_accuracy"])]
                + [fmt(e["int8_accuracy"].get(o)) for o in obs if o != "auto"]
                + [
                    f"{fmt(e['int8_accuracy']['auto'])} ({e['observer_auto']})",
                    fmt(e.get("int8_qat_accuracy")),
                    fmt(e.get("ort_int8_accuracy")),
                    fmt(e.get("ov_int8_accuracy")),
                    f"{e['file_ratio']:.2f}x",
                ]
                for e in rows
            ],
        )
    pipes = [e for n, e in by_name.items() if n.startswith("test_pipeline_with_an_int8_stage[")]
    if pipes:
        out += section(
            "The pipeline chooses INT8 (bench/test_bench_int8.py)",
            "`compress pipeline` with an `int8` stage (`finetune = { epochs = [0, 1] }`: PTQ first, one epoch of QAT "
            f"only if PTQ misses) under a {fmt(pipes[0]['budget_pt'], 1)} pt budget judged on the held-out split "
            f"(drop + 1 SE); test accuracy on {pipes[0]['eval_data']}; latency of the input FP32 model and the "
            "result at batch 32, interleaved, 95% interval; ratio: FP32 bytes over the INT8 file.",
            [
                "pipeline",
                "stages kept",
                "int8 candidates (validation %, verdict)",
                "test % before → after",
                "MACs",
                "ratio",
                "FP32 → result ms",
                "speed",
            ],
            [
                [
                    e["case"],
                    ", ".join(_kept(st) for st in e["stages"]),
                    "; ".join(
                        f"{'PTQ' if not t['qat_epochs'] else 'QAT'}: {fmt(t['accuracy'])} {t['verdict'].split(':')[0]}"
                        for t in e["int8_tried"]
                    ),
                    f"{fmt(e['test_before'])} → {fmt(e['test_after'])}",
                    f"{e['macs_fraction']:.2f}x",
                    f"{fmt(e['ratio'])}x",
                    f"{fmt(e['fp32_ms_b32'])} → {fmt(e['final_ms_b32'])}",
                    e["verdict"],
                ]
                for e in pipes
            ],
        )
    return out


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    rows = []
    for b in sorted(data["benchmarks"], key=lambda b: b["fullname"]):
        e = b.get("extra_info", {})
        rows.append(
            "| "
            + " | ".join(
                [
                    b["name"].replace("test_", ""),
                    fmt(e.get("compression_ratio")) + ("x" if e.get("compression_ratio") else ""),
                    fmt(e.get("base_accuracy")),
                    fmt(e.get("accuracy")),
                    fmt(e.get("accuracy_drop")),
                    fmt(e.get("latency_ms"), 3),
                    fmt(b["stats"]["median"], 2),
                    ", ".join(
                        f"{k}={v}"
                        for k, v in e.items()
                        if k
                        in (
                            "speedup_batch32",
                            "macs_reduction",
                            "times_zlib",
                            "file_bytes",
                            "cpz_bytes",
                            "metric",
                            "method",
                            "wall_s_1_process",
                            "wall_s_2_processes",
                        )
                    ),
                ]
            )
            + " |"
        )
    machine = data.get("machine_info", {})
    head = [
        "# Results",
        "",
        "Rendered by `bench/render_results.py` from the JSON that `make bench` writes; do not edit by hand.",
        f"Run: {datetime.now(timezone.utc).strftime('%Y-%m-%d')}, {machine.get('processor') or platform.machine()} "
        f"({machine.get('cpu', {}).get('count', '?')} CPUs), "
        f"Python {machine.get('python_version', platform.python_version())}, "
        "torch threads 2.",
        "",
        "Accuracy is top-1 % on the official MNIST test set (10,000 digits) where it was available "
        "(`eval_data` in the JSON says), models trained on 80% of the 5,000 embedded mnist5k digits. "
        "`compression_ratio` is dense FP32 bytes / compressed bytes (file bytes for .cpz and the peer baseline; "
        "params or nonzeros where the benchmark says so). Time is the median seconds of the timed call.",
        "",
        "| benchmark | ratio | base acc % | acc % | drop pt | latency ms (b32) | time s | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_name = {b["name"]: b.get("extra_info", {}) for b in data["benchmarks"]}
    side = [
        "",
        "## compress pipeline vs the peer baseline",
        "",
        "The same trained model through `compress pipeline` (default recipe, 0.5 pt budget on held-out "
        "training data) and through what a user would otherwise do with plain PyTorch "
        "(torch.nn.utils.prune global magnitude pruning to 92% + the same fine-tuning, dynamic INT8, gzip).",
        "",
        "| model | compress .cpz bytes | ratio | drop pt | peer bytes | peer ratio | peer drop pt |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in ("lenet5", "lenet300"):
        c = by_name.get(f"test_pipeline_deep_compression[{model}]")
        p = by_name.get(f"test_peer_baseline[{model}]")
        if c and p:
            side.append(
                f"| {model} | {c.get('file_bytes', 0):,} | {fmt(c['compression_ratio'])}x | "
                f"{fmt(c['accuracy_drop'])} | {p.get('file_bytes', 0):,} | {fmt(p['compression_ratio'])}x | "
                f"{fmt(p['accuracy_drop'])} |"
            )
    if len(side) == 7:
        side = []
    peer = nncodec(by_name) or kept_section(dst, "## NNCodec")
    prunetrain = kept_section(dst, "## PruneTrain")  # written by bench/prunetrain_time.py (its own runs, not pytest's)
    open(dst, "w").write(
        "\n".join(
            head
            + rows
            + side
            + anchors(by_name)
            + peer
            + matrix(by_name)
            + graph_decode(by_name)
            + user_data(by_name)
            + targets(by_name)
            + timing(by_name)
            + confidence(by_name)
            + extensions(by_name)
            + int8(by_name)
            + prunetrain
        )
        + "\n"
    )
    print(f"wrote {dst} ({len(rows)} benchmarks)")


# headings of sections older renderers wrote and this one does not: a partial run's update removes them
RETIRED = (
    "## NNCodec beside .cpz, on the same weights (the 2026-11-26 run)",
    "## INT8 that PyTorch executes: accuracy (bench/test_bench_int8.py)",
    "## INT8 that PyTorch executes: speed, memory, file (bench/test_bench_int8.py)",
    "## INT8 in PyTorch: compress's FX flow beside PT2E + inductor (bench/test_bench_int8.py)",
)


def _sections(lines: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Lines before the first ``## `` heading, and each section as (heading, its lines without the heading)."""
    head: list[str] = []
    out: list[tuple[str, list[str]]] = []
    for ln in lines:
        if ln.startswith("## "):
            out.append((ln, []))
        elif out:
            out[-1][1].append(ln)
        else:
            head.append(ln)
    return head, out


def update(src: str, dst: str) -> None:
    """Splice a partial run's sections into ``dst`` (see the module's docstring)."""
    data = json.load(open(src))
    by_name = {b["name"]: b.get("extra_info", {}) for b in data["benchmarks"]}
    renderers = (anchors, nncodec, matrix, graph_decode, user_data, targets, timing, confidence, extensions, int8)
    _, new = _sections([ln for r in renderers for ln in r(by_name)])
    if not new:
        sys.exit(f"{src}: no benchmark of it renders a section")
    when = str(data.get("datetime", datetime.now(timezone.utc).isoformat()))[:10]
    fresh = {h: ["", f"*Updated from a partial run of {when}.*", *body] for h, body in new}
    head, old = _sections(open(dst).read().rstrip("\n").split("\n"))
    out, placed = list(head), set()
    for h, body in old:
        if h in fresh:
            out += [h, *fresh[h]]
            placed.add(h)
        elif h in RETIRED:
            for n, b in fresh.items():  # a retired section's place goes to the new ones not placed yet
                if n not in placed:
                    out += [n, *b]
                    placed.add(n)
        else:
            out += [h, *body]
    for n, b in fresh.items():
        if n not in placed:
            out += ["", n, *b]
    open(dst, "w").write("\n".join(out).rstrip("\n") + "\n")
    print(f"updated {dst}: {len(fresh)} section(s) from {src}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[3] == "--update":
        update(sys.argv[1], sys.argv[2])
    elif len(sys.argv) == 3:
        main(sys.argv[1], sys.argv[2])
    else:
        sys.exit("usage: render_results.py BENCH.json OUT.md [--update]")
