"""Run the real Orthanc (Debian package) as a child process with its own configuration.

Used by the tests and the demo: no Docker engine runs on the build machines. The generated
configuration is ``config/orthanc.json`` with the ports, directories, modality addresses, the
routing Lua script and the plugin path overridden; ``/etc/orthanc`` is never read (it loads
every plugin and merges every ``*.json`` there).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from node.errors import ArchiveError

logger = logging.getLogger(__name__)

ORTHANC_EXECUTABLE = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
CONFIG_TEMPLATE = CONFIG_DIR / "orthanc.json"
ROUTING_SCRIPT = CONFIG_DIR / "route-stable-studies.lua"

_given_ports: set[int] = set()
_port_lock = threading.Lock()


def free_port() -> int:
    """A free TCP port on loopback, never the same twice in this process.

    Orthanc cannot bind port 0, so the port is picked here; another process could still take
    it in between (unlikely on an ephemeral port).
    """
    with _port_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _given_ports:
                _given_ports.add(port)
                return port


class OrthancServer:
    """A real Orthanc in the foreground, as a context manager.

    Parameters
    ----------
    workdir:
        Holds the generated ``orthanc.json``, the storage/index directory and ``orthanc.log``.
    node_port, node_host, node_aet:
        Address of the liver node, registered as modality ``NODE`` (routing target, and allowed
        to C-STORE results back).
    scanner_aet, scanner_host:
        The modality ``SCANNER`` allowed to C-STORE into Orthanc.
    stable_age:
        Orthanc's ``StableAge`` in seconds (``OnStableStudy`` fires that long after the last
        instance, plus ~1 s of the stable-event monitor).
    http_port, dicom_port:
        Free ports by default.
    aet:
        Orthanc's own AE title.
    lua_scripts:
        Lua scripts to load (default: the routing script); an empty list disables routing.
    extra_config:
        Keys merged last into the configuration.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        node_port: int = 11112,
        node_host: str = "127.0.0.1",
        node_aet: str = "LIVERNODE",
        scanner_aet: str = "SCANNER",
        scanner_host: str = "127.0.0.1",
        stable_age: int = 2,
        http_port: int | None = None,
        dicom_port: int | None = None,
        aet: str = "ORTHANC",
        lua_scripts: list[Path] | None = None,
        extra_config: dict[str, Any] | None = None,
        executable: Path = ORTHANC_EXECUTABLE,
        plugin: Path = DICOMWEB_PLUGIN,
        template: Path = CONFIG_TEMPLATE,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.aet = aet
        self.executable = executable
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        scripts = [ROUTING_SCRIPT] if lua_scripts is None else lua_scripts
        self.config = self._build_config(
            template, plugin, scripts, stable_age, node_host, node_port, node_aet,
            scanner_aet, scanner_host,
        )
        self.config.update(extra_config or {})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        """Root of the REST API, e.g. ``http://127.0.0.1:8042``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Root of the DICOMweb plugin's services."""
        return f"{self.http_url}/dicom-web"

    def _build_config(
        self, template: Path, plugin: Path, scripts: list[Path], stable_age: int,
        node_host: str, node_port: int, node_aet: str, scanner_aet: str, scanner_host: str,
    ) -> dict[str, Any]:
        try:
            config: dict[str, Any] = json.loads(template.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ArchiveError(f"cannot read Orthanc configuration template {template}") from exc
        storage = self.workdir / "db"
        modalities = config.setdefault("DicomModalities", {})
        modalities.setdefault("NODE", {}).update(AET=node_aet, Host=node_host, Port=node_port)
        modalities.setdefault("SCANNER", {}).update(AET=scanner_aet, Host=scanner_host)
        config.update(
            HttpPort=self.http_port,
            DicomPort=self.dicom_port,
            DicomAet=self.aet,
            StorageDirectory=str(storage),
            IndexDirectory=str(storage),
            StableAge=stable_age,
            LuaScripts=[str(Path(s).resolve()) for s in scripts],
            Plugins=[str(plugin)],
            RemoteAccessAllowed=False,
        )
        # dicomweb-client sends a Host header without the port: pin it (toolchain notes).
        config.setdefault("DicomWeb", {}).update(
            Enable=True, Root="/dicom-web/", Host=f"127.0.0.1:{self.http_port}"
        )
        return config

    def start(self, timeout: float = 20.0) -> None:
        """Write the configuration, start Orthanc and wait until ``GET /system`` answers.

        Raises
        ------
        ArchiveError
            Orthanc exited or did not answer within ``timeout`` (see ``orthanc.log``).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        # Debian's Orthanc sets TCP_NODELAY on its DICOM sockets only with this variable.
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [str(self.executable), "--verbose", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ArchiveError(
                    f"Orthanc exited with {self._process.returncode}; see {self.log_path}:\n"
                    + self.log_tail()
                )
            try:
                self.get("/system")
                logger.info("Orthanc ready: http=%s dicom=%d aet=%s pid=%d",
                            self.http_url, self.dicom_port, self.aet, self._process.pid)
                return
            except ArchiveError:
                time.sleep(0.05)
        self.stop()
        raise ArchiveError(f"Orthanc did not answer within {timeout} s; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate Orthanc (SIGTERM), kill it if it has not exited after ``timeout``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("Orthanc pid %d did not stop within %.0f s: killing", process.pid, timeout)
            process.kill()
            process.wait()

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        """POST JSON (or bytes) to a REST resource and decode the JSON answer."""
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.http_url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as rsp:
                payload = rsp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise ArchiveError(f"Orthanc {method} {path} failed: {exc}") from exc
        return json.loads(payload) if payload else None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of Orthanc's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> OrthancServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
