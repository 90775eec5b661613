"""Speed and memory of the whole analysis of one four-series 512x512 phantom study.

For each slice thickness, a phantom study is generated, then a fresh Python process loads it
(study assembly from the DICOM files) and analyses it; the child reports wall time and its own
peak resident set size, so generation does not count. It reports its CPU time too: on a shared
machine the wall time depends on the other jobs, the CPU time much less. Budgets (issue #5):
5 mm slices <= 20 s and <= 2 GB, 1.25 mm slices <= 60 s and <= 4 GB.

    .venv/bin/python benchmarks/pipeline.py [--size 512] [--thickness 5 1.25]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGETS = {5.0: (20.0, 2.0), 1.25: (60.0, 4.0)}  # thickness mm -> (seconds, GB)


def _child(study_dir: Path) -> None:
    """Load + analyse one study; print a JSON line with the figures."""
    from node.analysis import analyze
    from node.study.assembly import load_study_dir

    t0 = time.perf_counter()
    study = load_study_dir(study_dir)
    t1 = time.perf_counter()
    result = analyze(study)
    t2 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = usage.ru_maxrss  # Linux: kilobytes
    print(json.dumps({"load_s": t1 - t0, "analyze_s": t2 - t1, "peak_gb": peak_kb / 1024**2,
                      "cpu_s": usage.ru_utime + usage.ru_stime,
                      "slices": int(study.reference.array.shape[0]),
                      "lesions": len(result.lesions)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--thickness", type=float, nargs="+", default=[5.0, 1.25])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child)
        return
    from node.phantom import generate_baseline

    with tempfile.TemporaryDirectory() as tmp:
        for thick in args.thickness:
            out = generate_baseline(Path(tmp) / f"s{thick}", args.seed, size=args.size,
                                    slice_thickness_mm=thick, n_lesions=5)
            proc = subprocess.run([sys.executable, __file__, "--child", str(out / "dicom")],
                                  capture_output=True, text=True, check=True)
            fig = json.loads(proc.stdout.strip().splitlines()[-1])
            total = fig["load_s"] + fig["analyze_s"]
            budget = BUDGETS.get(thick)
            verdict = ""
            if budget:
                ok = total <= budget[0] and fig["peak_gb"] <= budget[1]
                verdict = f"  budget {budget[0]:.0f} s / {budget[1]:.0f} GB: " + (
                    "PASS" if ok else "FAIL")
            print(f"{args.size}x{args.size}, {thick} mm, {fig['slices']} slices x 4 phases: "
                  f"load {fig['load_s']:.1f} s + analysis {fig['analyze_s']:.1f} s = "
                  f"{total:.1f} s, peak RSS {fig['peak_gb']:.2f} GB, "
                  f"{fig['lesions']} lesions, CPU {fig['cpu_s']:.1f} s{verdict}", flush=True)


if __name__ == "__main__":
    main()
