"""Fail when a benchmark's compression or accuracy regresses against a stored baseline.

    python bench/check_quality.py NEW.json BASELINE.json [--ratio-tol 0.05] [--drop-tol 0.5]

Timings are compared by pytest-benchmark itself (--benchmark-compare-fail); this checks what
matters more here: compression_ratio must not fall by more than ratio-tol (relative) and
accuracy_drop must not grow by more than drop-tol (points).
"""

from __future__ import annotations

import argparse
import json
import sys


def extra(path: str) -> dict[str, dict]:
    return {b["fullname"]: b.get("extra_info", {}) for b in json.load(open(path))["benchmarks"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("new")
    ap.add_argument("baseline")
    ap.add_argument("--ratio-tol", type=float, default=0.05)
    ap.add_argument("--drop-tol", type=float, default=0.5)
    a = ap.parse_args(argv)
    new, base = extra(a.new), extra(a.baseline)
    failures = []
    for name, b in base.items():
        n = new.get(name)
        if n is None:
            failures.append(f"{name}: missing from the new run")
            continue
        if b.get("eval_data") != n.get("eval_data"):
            print(f"{name}: evaluated on {n.get('eval_data')} vs baseline {b.get('eval_data')}; accuracy not compared")
        elif (
            b.get("accuracy_drop") is not None
            and n.get("accuracy_drop") is not None
            and n["accuracy_drop"] > b["accuracy_drop"] + a.drop_tol
        ):
            failures.append(
                f"{name}: accuracy drop {n['accuracy_drop']} > baseline {b['accuracy_drop']} + {a.drop_tol}"
            )
        if (
            b.get("compression_ratio")
            and n.get("compression_ratio") is not None
            and n["compression_ratio"] < b["compression_ratio"] * (1 - a.ratio_tol)
        ):
            failures.append(f"{name}: compression ratio {n['compression_ratio']} < baseline {b['compression_ratio']}")
    for f in failures:
        print("REGRESSION", f)
    print(f"{len(base)} benchmarks compared, {len(failures)} regressions")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
