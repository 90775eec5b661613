"""Open the node's SEG + TID 1500 SR in a real OHIF viewer and check it shows the measurements.

Starts a real Orthanc (Debian package, DICOMweb plugin) on free ports, writes a small phantom
study, analyses it with the node (``liver-node phantom`` + ``liver-node analyze``), uploads CT +
SEG + SR, serves the prebuilt OHIF viewer (npm ``@ohif/app``, ``dist/``) and a reverse proxy to
Orthanc's ``/dicom-web`` from ONE origin (no CORS), then drives Debian's chromium headless with
Playwright: opens the study, loads the SR display set, and checks

- no "Something went wrong" error page,
- the measurement text beside each outline shows Area / Long axis / Short axis / Volume with
  the SR's values,
and reports (INFO, not a check) whether the measurement panel lists the lesions: OHIF lists
only SRs whose Tracking Identifiers follow its own tool naming, which the node does not use.

The SR viewport is stepped through its measurements (one per Tracking UID) with OHIF's
arrows; a screenshot of each is written, the first to ``--out``, the next ones beside it as
``NAME-2.png``, ``NAME-3.png`` ... PASS/FAIL lines are printed; the exit code is 0 only when
every check passed, 2 when something essential is missing (nothing is faked).

    .venv/bin/python benchmarks/ohif_check.py [--out /tmp/ohif_check.png] [--keep]

Needs (none of them is a project dependency; install by hand for this check):
- ``apt-get install chromium orthanc orthanc-dicomweb``
- ``.venv/bin/pip install playwright`` (the Python package only: NEVER ``playwright install``,
  the browser is Debian's chromium, given as ``executable_path``)
- ``@ohif/app`` 3.13.2: fetched once with ``npm pack`` into ``--ohif-cache`` (or give
  ``--ohif-dist`` pointing at an unpacked ``package/dist``).
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node.archive.orthanc import (  # noqa: E402
    DICOMWEB_PLUGIN,
    ORTHANC_EXECUTABLE,
    OrthancServer,
    free_port,
)

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
CHROMIUM = Path("/usr/bin/chromium")
LIVER_NODE = Path(sys.executable).with_name("liver-node")
DEFAULT_CACHE = Path.home() / ".cache" / "liver-node" / "ohif"

#: Values OHIF must show in the SR's measurement text (the first NUMs of the merged groups).
EXPECTED_LABELS = ("Area", "Long axis", "Short axis", "Volume")


class Missing(Exception):
    """Something essential for the check is not available on this machine."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- prerequisites


def find_ohif_dist(dist: Path | None, cache: Path, version: str) -> Path:
    """The prebuilt OHIF ``dist/``: given, cached, or fetched once with ``npm pack``."""
    if dist is not None:
        if not (dist / "index.html").is_file():
            raise Missing(f"--ohif-dist {dist} has no index.html")
        return dist
    unpacked = cache / f"app-{version}" / "package" / "dist"
    if (unpacked / "index.html").is_file():
        return unpacked
    npm = shutil.which("npm")
    if npm is None:
        raise Missing(f"npm is not installed: cannot fetch {OHIF_PACKAGE}@{version}")
    cache.mkdir(parents=True, exist_ok=True)
    log(f"fetching {OHIF_PACKAGE}@{version} with npm pack into {cache}")
    proc = subprocess.run(
        [npm, "pack", f"{OHIF_PACKAGE}@{version}", "--pack-destination", str(cache)],
        capture_output=True, text=True, cwd=cache,
    )
    tgz = cache / f"ohif-app-{version}.tgz"
    if proc.returncode != 0 or not tgz.is_file():
        raise Missing(f"npm pack {OHIF_PACKAGE}@{version} failed:\n{proc.stderr[-2000:]}")
    with tarfile.open(tgz) as tar:
        tar.extractall(cache / f"app-{version}", filter="data")
    if not (unpacked / "index.html").is_file():
        raise Missing(f"{OHIF_PACKAGE}@{version} has no prebuilt dist/index.html")
    return unpacked


def check_prerequisites() -> None:
    missing = []
    for path, hint in (
        (ORTHANC_EXECUTABLE, "apt-get install orthanc"),
        (DICOMWEB_PLUGIN, "apt-get install orthanc-dicomweb"),
        (CHROMIUM, "apt-get install chromium"),
        (LIVER_NODE, "pip install -e . (the liver-node console script)"),
    ):
        if not path.exists():
            missing.append(f"{path} ({hint})")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append(
            "Python package playwright in this interpreter "
            f"({sys.executable} -m pip install playwright; never `playwright install`)"
        )
    if missing:
        raise Missing("; ".join(missing))


# --------------------------------------------------------------------------- data


def make_results(workdir: Path, size: int, lesions: int, seed: int) -> tuple[Path, list[Path]]:
    """Phantom study + the node's SEG and SR for it: (study dicom dir, [SEG, SR])."""
    study = workdir / "study"
    out = workdir / "results"
    subprocess.run(
        [str(LIVER_NODE), "phantom", "--size", str(size), "--lesions", str(lesions),
         "--seed", str(seed), str(study)],
        check=True, stdout=subprocess.DEVNULL,
    )
    proc = subprocess.run(
        [str(LIVER_NODE), "analyze", "--out", str(out), str(study / "dicom")],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"liver-node analyze failed:\n{proc.stderr[-3000:]}")
    print(proc.stdout.strip())
    results = sorted(out.glob("SEG-*.dcm")) + sorted(out.glob("SR-*.dcm"))
    if len(results) != 2:
        raise RuntimeError(f"expected one SEG and one SR in {out}, found {results}")
    return study / "dicom", results


def upload(orthanc: OrthancServer, files: list[Path]) -> None:
    for path in files:
        orthanc.post("/instances", path.read_bytes())


def sr_summary(sr_path: Path) -> dict[str, Any]:
    """What OHIF should show for the SR: per Tracking UID (OHIF merges groups by it), in SR
    order, the Tracking Identifier and the NUMs as (label, value, unit code)."""
    import pydicom

    ds = pydicom.dcmread(sr_path)
    groups: dict[str, dict[str, Any]] = {}
    for container in ds.ContentSequence:
        for group in getattr(container, "ContentSequence", []):
            if group.ValueType != "CONTAINER" or "ContentSequence" not in group:
                continue
            ident = uid = None
            nums: list[tuple[str, float, str]] = []
            for item in group.ContentSequence:
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                if item.ValueType == "TEXT" and name == "Tracking Identifier":
                    ident = item.TextValue
                elif item.ValueType == "UIDREF" and name == "Tracking Unique Identifier":
                    uid = item.UID
                elif item.ValueType == "NUM" and "MeasuredValueSequence" in item:
                    mv = item.MeasuredValueSequence[0]
                    nums.append((name, float(mv.NumericValue),
                                 mv.MeasurementUnitsCodeSequence[0].CodeValue))
            if uid is None:
                continue
            entry = groups.setdefault(uid, {"tracking": ident, "nums": []})
            entry["nums"].extend(nums)
    return {
        "study": ds.StudyInstanceUID,
        "series": ds.SeriesInstanceUID,
        "sop": ds.SOPInstanceUID,
        "tracking": [g["tracking"] for g in groups.values()],
        "groups": list(groups.values()),
    }


# --------------------------------------------------------------------------- one origin


def app_config(origin: str) -> str:
    root = f"{origin}/dicom-web"
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc",
        "investigationalUseDialog": {"option": "never"},
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "Orthanc (liver-node check)",
                    "name": "orthanc",
                    "wadoUriRoot": root,
                    "qidoRoot": root,
                    "wadoRoot": root,
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "staticWado": False,
                    "singlepart": "",
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


def make_handler(dist: Path, upstream: str, config_js: bytes) -> type[BaseHTTPRequestHandler]:
    index = (dist / "index.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes, ctype: str,
                  extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            # Same origin everywhere; lets OHIF use SharedArrayBuffer like its dev server.
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else None
            req = urllib.request.Request(upstream + self.path, data=data, method=self.command)
            for key in ("Accept", "Content-Type"):
                if self.headers.get(key):
                    req.add_header(key, self.headers[key])
            try:
                with urllib.request.urlopen(req, timeout=60) as rsp:
                    body, code, headers = rsp.read(), rsp.status, rsp.headers
            except urllib.error.HTTPError as exc:
                body, code, headers = exc.read(), exc.code, exc.headers
            except (urllib.error.URLError, OSError) as exc:
                self._send(502, str(exc).encode(), "text/plain")
                return
            self._send(code, body, headers.get("Content-Type", "application/octet-stream"))

        def _static(self) -> None:
            path = self.path.split("?", 1)[0].split("#", 1)[0]
            if path == "/app-config.js":
                self._send(200, config_js, "application/javascript")
                return
            target = (dist / path.lstrip("/")).resolve()
            if path != "/" and target.is_file() and dist.resolve() in target.parents:
                ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                if target.suffix == ".wasm":
                    ctype = "application/wasm"
                elif target.suffix in (".js", ".mjs"):
                    ctype = "application/javascript"
                self._send(200, target.read_bytes(), ctype)
            else:  # single-page app: every route is index.html
                self._send(200, index, "text/html; charset=utf-8")

        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/dicom-web/"):
                self._proxy()
            else:
                self._static()

        do_HEAD = do_GET

        def do_POST(self) -> None:  # noqa: N802
            if self.path.startswith("/dicom-web/"):
                self._proxy()
            else:
                self._send(405, b"", "text/plain")

    return Handler


def serve(dist: Path, orthanc_url: str, port: int) -> ThreadingHTTPServer:
    origin = f"http://127.0.0.1:{port}"
    handler = make_handler(dist, orthanc_url, app_config(origin).encode())
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --------------------------------------------------------------------------- browser

ERROR_TEXTS = ("Something went wrong", "Sorry, something went wrong", "Something has gone wrong")
TEXT_LINE = re.compile(r"^\s*([^:]+?):\s*(-?[0-9]+(?:\.[0-9]+)?)\s*(.*?)\s*$")


def run_browser(origin: str, info: dict[str, Any], out: Path, timeout_s: float,
                headed: bool = False, hydrate: bool = True) -> dict[str, Any]:
    """Open the study, load the SR in the viewport, step through its measurements."""
    from playwright.sync_api import TimeoutError as PWTimeout
    from playwright.sync_api import sync_playwright

    found: dict[str, Any] = {"console_errors": [], "page_errors": [], "notes": [], "steps": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=not headed,
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                  "--ignore-gpu-blocklist"],
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(timeout_s * 1000)
        page.on("console", lambda m: found["console_errors"].append(m.text)
                if m.type == "error" else None)
        page.on("pageerror", lambda e: found["page_errors"].append(str(e)))

        def crashed() -> str | None:
            text = page.inner_text("body")
            return next((t for t in ERROR_TEXTS if t in text), None)

        def svg_lines() -> list[str]:
            texts = page.eval_on_selector_all(
                "[data-cy='viewport-pane'] svg text",
                "els => els.map(e => [...e.querySelectorAll('tspan')].map(t => t.textContent)"
                "  .filter(Boolean).join('\\n') || e.textContent)")
            return [line for t in texts for line in t.split("\n") if line.strip()]

        def click_if_visible(selector: str) -> bool:
            loc = page.locator(selector).first
            if loc.count() and loc.is_visible():
                loc.click()
                return True
            return False

        url = f"{origin}/viewer?StudyInstanceUIDs={info['study']}"
        log(f"open {url}")
        page.goto(url, wait_until="domcontentloaded")
        try:
            page.wait_for_selector("[data-cy='study-browser-thumbnail']")
        except PWTimeout:
            found["notes"].append("study browser never showed the series")
        page.wait_for_timeout(3000)  # first image viewport renders
        click_if_visible("button:has-text('Skip all')")  # the first-visit guided tour
        found["crash_before_sr"] = crashed()
        click_if_visible("[data-cy='trackedMeasurements-btn']")  # open the measurement panel

        # The SR is listed without an image thumbnail; double-click hangs it in the viewport.
        sr_item = None
        for item in page.query_selector_all("[data-cy^='study-browser-thumbnail']"):
            if re.search(r"(^|\s)SR(\s|$)", item.inner_text()):
                sr_item = item
                break
        if sr_item is None:
            found["notes"].append("no SR series in the study browser")
        else:
            sr_item.dblclick()
            page.wait_for_timeout(5000)
        found["crash"] = crashed()

        found["hydrate_prompt"] = page.locator(
            "text=Do you want to continue tracking measurements").count() > 0

        # Step through the SR's measurements with the viewport's arrows (each jumps to the
        # measurement's slice); the text box lines are read from the SVG annotation layer.
        n = len(info["groups"])
        for step in range(n):
            page.wait_for_timeout(1200)
            found["steps"].append(svg_lines())
            shot = out if step == 0 else out.with_name(f"{out.stem}-{step + 1}{out.suffix}")
            page.screenshot(path=str(shot))
            if step < n - 1 and not click_if_visible("[data-cy='viewport-action-arrows-right']"):
                found["notes"].append("no measurement navigation arrows in the viewport")
                break
        found["crash"] = found["crash"] or crashed()
        badge = page.locator("[data-cy^='ModalityLoadBadge']").first
        if badge.count():  # its tooltip says whether OHIF can load (track) the SR
            badge.hover()
            page.wait_for_timeout(800)
            tips = page.locator("[role='tooltip']")
            found["sr_badge_tooltip"] = tips.first.inner_text().strip() if tips.count() else ""
            page.mouse.move(5, 500)

        # Measurement panel: lists measurements only once the SR is hydrated (tracked).
        if found["hydrate_prompt"] and hydrate:
            click_if_visible("button:has-text('Yes')")
            page.wait_for_timeout(5000)
            found["crash"] = found["crash"] or crashed()
            found["notes"].append("SR hydrated (answered Yes to the tracking prompt)")
            page.screenshot(path=str(out.with_name(f"{out.stem}-hydrated{out.suffix}")))
        panel = page.locator("#viewerLayoutResizableRightPanel")
        found["panel_text"] = panel.first.inner_text() if panel.count() else ""
        found["body_text"] = page.inner_text("body")
        browser.close()
    return found


def _parse_lines(lines: list[str]) -> list[tuple[str, float, str]]:
    parsed = []
    for line in lines:
        m = TEXT_LINE.match(line)
        if m:
            parsed.append((m.group(1).strip(), float(m.group(2)), m.group(3)))
    return parsed


def evaluate(found: dict[str, Any], info: dict[str, Any]) -> list[tuple[bool | None, str]]:
    checks: list[tuple[bool | None, str]] = []
    crash = found.get("crash") or found.get("crash_before_sr")
    checks.append((not crash, "no 'Something went wrong' error page"
                   + (f" (saw {crash!r})" if crash else "")))

    # Which SR measurement (Tracking UID group) each navigation step displayed: match the
    # displayed values against the SR's NUMs (OHIF prints them rounded to 2 decimals).
    shown: dict[str, list[tuple[str, float, str]]] = {}
    for lines in found.get("steps", []):
        parsed = _parse_lines(lines)
        for group in info["groups"]:
            expected = {(label, round(value, 2)) for label, value, _ in group["nums"][:5]}
            if any((label, round(value, 2)) in expected for label, value, _ in parsed):
                shown.setdefault(group["tracking"], parsed)
    lesions = [g for g in info["groups"] if (g["tracking"] or "").lower().startswith("lesion")]
    for group in info["groups"]:
        ident = group["tracking"]
        is_lesion = group in lesions
        if ident not in shown:
            if is_lesion:
                checks.append((False, f"{ident}: no measurement text found in the SR viewport"))
            else:
                print(f"INFO: {ident}: no measurement text found")
            continue
        parsed = shown[ident]
        text = "; ".join(f"{label}: {value:g} {unit}".strip() for label, value, unit in parsed)
        if not is_lesion:
            print(f"INFO: {ident} text box: {text}")
            continue
        want = {label: value for label, value, _ in group["nums"]}
        got = {label: value for label, value, _ in parsed}
        missing = [lab for lab in EXPECTED_LABELS
                   if lab not in got or lab not in want or abs(got[lab] - want[lab]) > 0.006]
        checks.append((not missing, f"{ident} text box shows Area/Long axis/Short axis/Volume"
                       f" with the SR's values [{text}]"
                       + (f"; missing or wrong: {', '.join(missing)}" if missing else "")))
    panel = found.get("panel_text", "")
    listed = [g["tracking"] for g in lesions if g["tracking"] in panel]
    why = ""
    if len(listed) < len(lesions):
        tip = found.get("sr_badge_tooltip")
        why = f"; SR badge says: {tip!r}" if tip else ""
        first = panel.strip().splitlines()[:3]
        why += f"; panel shows: {' / '.join(first)!r}" if first else ""
    # Advisory, not a check: OHIF lists an SR in its panel only with its own Tracking
    # Identifier scheme ("Cornerstone3DTools@^0.1.0:PlanarFreehandROI..."), and then re-computes
    # the values from the image, dropping Volume and the axes; the node keeps readable ids.
    listing_ok = bool(lesions) and len(listed) == len(lesions)
    checks.append((None if not listing_ok else True,
                   f"measurement panel lists the lesions ({len(listed)}/{len(lesions)}"
                   f"{': ' + ', '.join(listed) if listed else ''}){why}"))
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/ohif_check.png"), help="screenshot PNG")
    ap.add_argument("--workdir", type=Path, help="default: a temporary directory")
    ap.add_argument("--ohif-dist", type=Path, help="unpacked @ohif/app package/dist")
    ap.add_argument("--ohif-cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--ohif-version", default=OHIF_VERSION)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--lesions", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=90.0, help="browser time budget, s")
    ap.add_argument("--keep", action="store_true",
                    help="keep Orthanc + OHIF running after the check until Ctrl-C")
    ap.add_argument("--headed", action="store_true", help="show the browser (needs a display)")
    ap.add_argument("--dump", type=Path, help="write what the page showed (JSON) here")
    ap.add_argument("--no-hydrate", action="store_true",
                    help="do not answer Yes when OHIF offers to track (hydrate) the SR")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    try:
        check_prerequisites()
        dist = find_ohif_dist(args.ohif_dist, args.ohif_cache, args.ohif_version)
    except Missing as exc:
        print(f"MISSING: {exc}")
        print("FAIL: OHIF check not run (missing prerequisites)")
        return 2
    log(f"OHIF dist: {dist}")

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ohif_check_")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    web_port = free_port()
    orthanc = OrthancServer(workdir / "orthanc", lua_scripts=[])
    # Bulk data URIs in DICOMweb metadata must point at the single origin, not Orthanc.
    orthanc.config["DicomWeb"]["Host"] = f"127.0.0.1:{web_port}"
    web = None
    try:
        log("phantom + analysis")
        study_dir, results = make_results(workdir, args.size, args.lesions, args.seed)
        info = sr_summary(results[1])
        log(f"SR tracking identifiers: {info['tracking']}")
        orthanc.start()
        ct = sorted(p for p in study_dir.rglob("*") if p.is_file())
        upload(orthanc, ct + results)
        log(f"uploaded {len(ct)} CT + SEG + SR to Orthanc {orthanc.http_url}")
        web = serve(dist, orthanc.http_url, web_port)
        origin = f"http://127.0.0.1:{web_port}"
        log(f"OHIF + /dicom-web proxy on {origin}")
        t_browser = time.monotonic()
        found = run_browser(origin, info, args.out.resolve(), args.timeout, args.headed,
                            hydrate=not args.no_hydrate)
        log(f"browser part took {time.monotonic() - t_browser:.0f} s; screenshot {args.out}")
        if args.dump:
            args.dump.write_text(json.dumps(found, indent=1))
        checks = evaluate(found, info)
        for ok, what in checks:
            print(f"{'INFO' if ok is None else 'PASS' if ok else 'FAIL'}: {what}")
        for note in found["notes"]:
            print(f"NOTE: {note}")
        errors = found["page_errors"] + found["console_errors"]
        if errors:
            print(f"NOTE: {len(errors)} browser errors, first: {errors[0][:300]}")
        all_ok = all(ok is not False for ok, _ in checks)
        print(f"{'PASS' if all_ok else 'FAIL'}: OHIF {args.ohif_version} check "
              f"({time.monotonic() - t0:.0f} s)")
        if args.keep:
            print(f"keeping {origin}/viewer?StudyInstanceUIDs={info['study']} up; Ctrl-C ends")
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0 if all_ok else 1))
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0 if all_ok else 1
    finally:
        if web is not None:
            web.shutdown()
        orthanc.stop()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
