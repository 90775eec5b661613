"""Benchmark: time and peak memory to assemble and classify a four-series 512 x 512 study.

Usage::

    python benchmarks/assembly.py [--cache DIR] [--thickness 5 1.25] [--repeat 2]

For each slice thickness a phantom study (native, arterial, portal venous, delayed; 512 x 512)
is generated once into the cache directory, then assembled by :func:`load_study_dir` in a fresh
child process (so that its peak RSS is the assembly's alone). Bar: < 3 s and < 1.5 GB for the
5 mm study on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BAR_SECONDS = 3.0
BAR_RSS_GB = 1.5

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from node.study.assembly import load_study_dir
t1 = time.perf_counter()
study = load_study_dir(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({
    "seconds": t2 - t1, "import_seconds": t1 - t0,
    "phases": {p.value: list(v.array.shape) for p, v in study.volumes.items()},
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def ensure_phantom(cache: Path, thickness_mm: float) -> Path:
    """The cached 512 x 512 phantom study of this slice thickness (generated once)."""
    from node.phantom import generate_baseline

    out = cache / f"bench512_{thickness_mm:g}mm"
    if not (out / "truth.json").is_file():
        t0 = time.perf_counter()
        generate_baseline(out, 2024, size=512, slice_thickness_mm=thickness_mm, n_lesions=4)
        print(f"generated {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def measure(study_dir: Path) -> dict[str, object]:
    """Assemble + classify in a child process; its wall time and peak RSS."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(study_dir / "dicom")],
                          capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if the 5 mm study misses the bar."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/liver-node-bench"))
    parser.add_argument("--thickness", type=float, nargs="+", default=[5.0, 1.25])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    ok = True
    for thickness in args.thickness:
        study_dir = ensure_phantom(args.cache, thickness)
        files = sum(1 for _ in (study_dir / "dicom").rglob("*.dcm"))
        runs = [measure(study_dir) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: float(r["seconds"]))  # type: ignore[arg-type]
        secs, rss = float(best["seconds"]), float(best["peak_rss_mb"])  # type: ignore[arg-type]
        line = (f"{thickness:g} mm: {files} files, assemble+classify {secs:.2f} s "
                f"(best of {args.repeat}), peak RSS {rss:.0f} MB, phases {best['phases']}")
        if thickness == 5.0:
            passed = secs < BAR_SECONDS and rss < BAR_RSS_GB * 1024
            ok &= passed
            line += f"  bar < {BAR_SECONDS:g} s, < {BAR_RSS_GB:g} GB: " + (
                "PASS" if passed else "FAIL")
        print(line, flush=True)
    print(f"(benchmark process peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
