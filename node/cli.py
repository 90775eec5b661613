"""Command line: ``liver-node serve | analyze | phantom | demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from node import ALGORITHM_NAME, RESEARCH_DISCLAIMER, __version__

logger = logging.getLogger("node")


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom and highdicom log every PDU / copied module at INFO: keep them at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the DICOM listener; each complete study is analysed and its results sent back."""
    from node.config import load_settings
    from node.service import serve_forever

    overrides = {k: v for k, v in {"port": args.port, "ae_title": args.ae_title,
                                   "spool_dir": args.spool_dir,
                                   "metrics_port": args.metrics_port}.items() if v is not None}
    settings = load_settings(Path(args.config) if args.config else None, overrides)
    return serve_forever(settings)


def cmd_analyze(args: argparse.Namespace) -> int:
    """Analyse a study folder offline, or ask the running node to analyse a spooled study."""
    from node import pipeline

    if args.study:
        return _request_analysis(args)
    if not args.study_dir:
        print("liver-node analyze: give a STUDY_DIR or --study UID", file=sys.stderr)
        return 2

    send = []
    if args.send:
        ae, _, hostport = args.send.partition("@")
        host, _, port = hostport.rpartition(":")
        send.append((ae, host, int(port), args.calling_aet))
    outcome = pipeline.run(Path(args.study_dir), Path(args.out), dicomweb_url=args.dicomweb,
                           send=send)
    print(pipeline.format_report(outcome))
    print(f"SEG: {outcome.seg_path}\nSR:  {outcome.sr_path}")
    return 0


def _request_analysis(args: argparse.Namespace) -> int:
    """``analyze --study UID``: mark a spooled study for analysis by the node (explicit trigger).

    Works whether or not the node runs: a running node picks it up at its next scan, a
    stopped one at its next start.
    """
    from node.config import load_settings
    from node.errors import NodeError
    from node.ingest import request_analysis

    overrides = {"spool_dir": args.spool_dir} if args.spool_dir else {}
    settings = load_settings(Path(args.config) if args.config else None, overrides)
    try:
        marked = request_analysis(Path(settings.spool_dir), args.study)
    except NodeError as exc:
        print(f"liver-node analyze: {exc}", file=sys.stderr)
        return 1
    print(f"study {args.study}: " + ("queued for analysis" if marked
                                     else "already queued or being analysed"))
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    """Write a synthetic multi-phase study with ground truth."""
    from node.phantom import generate_baseline, generate_follow_up, load_truth

    out = Path(args.out_dir)
    if args.follow_up_of:
        generate_follow_up(Path(args.follow_up_of), out, args.seed, months=args.months,
                           tace=args.tace, target_category=args.category)
    else:
        generate_baseline(out, args.seed, size=args.size, n_lesions=args.lesions,
                          lesion_diameter_mm=(args.min_diameter, args.max_diameter))
    truth = load_truth(out)
    print(f"wrote {out}/dicom (study {truth['study_instance_uid']}), truth in {out}/truth.json")
    for les in truth["lesions"]:
        print(f"  {les['truth_id']:<4} {les['status']:<9} {les['volume_ml']:8.1f} ml")
    if "category" in truth:
        change = truth["volume_change_fraction"] * 100
        print(f"  total change {change:+.1f}% -> {truth['category']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Orthanc + node + a phantom baseline and follow-up sent as a scanner would."""
    from node.demo import run_demo

    return run_demo(Path(args.workdir), size=args.size, seed=args.seed, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="liver-node",
        description=f"{ALGORITHM_NAME} {__version__}. {RESEARCH_DISCLAIMER}.",
    )
    p.add_argument("--version", action="version", version=f"liver-node {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the DICOM listener (C-ECHO, C-STORE)")
    s.add_argument("--config", help="TOML settings file (see config/node.toml)")
    s.add_argument("--port", type=int)
    s.add_argument("--ae-title")
    s.add_argument("--spool-dir")
    s.add_argument("--metrics-port", type=int, help="serve /metrics and /health on this port")
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser("analyze", help="analyse a study folder offline, or a spooled study")
    a.add_argument("study_dir", nargs="?")
    a.add_argument("--study", help="StudyInstanceUID in the node's spool: analyse it now")
    a.add_argument("--config", help="settings file (for --study: where the spool is)")
    a.add_argument("--spool-dir", help="spool directory (for --study)")
    a.add_argument("--out", default="liver-node-output")
    a.add_argument("--dicomweb", help="DICOMweb URL of the archive, to find the prior study")
    a.add_argument("--send", help="C-STORE results to AET@host:port")
    a.add_argument("--calling-aet", default="LIVERNODE")
    a.set_defaults(func=cmd_analyze)

    ph = sub.add_parser("phantom", help="write a synthetic three-phase study with ground truth")
    ph.add_argument("out_dir")
    ph.add_argument("--seed", type=int, default=1)
    ph.add_argument("--size", type=int, default=512)
    ph.add_argument("--lesions", type=int)
    ph.add_argument("--min-diameter", type=float, default=7.0)
    ph.add_argument("--max-diameter", type=float, default=70.0)
    ph.add_argument("--follow-up-of", help="baseline folder: write a follow-up of that patient")
    ph.add_argument("--months", type=int, default=2)
    ph.add_argument("--tace", action="store_true", help="lipiodol deposits after TACE")
    ph.add_argument("--category", choices=["CR", "PR", "MR", "SD", "PD"])
    ph.set_defaults(func=cmd_phantom)

    d = sub.add_parser("demo", help="run Orthanc + node and send a baseline and a follow-up")
    d.add_argument("--workdir", default="demo-output")
    d.add_argument("--size", type=int, default=512)
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--keep", action="store_true", help="keep Orthanc running until Ctrl-C")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the demo prints its own account; its components' INFO lines only with -v
    _setup_logging(args.verbose, quiet=args.command == "demo")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
