"""One frozen settings object: TOML file, then environment, then command-line flags.

Precedence, lowest to highest: the dataclass defaults, the TOML file, environment variables
``LIVER_NODE_<KEY>`` (top-level keys) and ``LIVER_NODE_<SECTION>_<KEY>`` (e.g.
``LIVER_NODE_ARCHIVE_HOST``), then the ``overrides`` mapping built from command-line flags.
Unknown keys and bad values raise :class:`~node.errors.ConfigError` naming the key and where it
came from, so a typo never silently falls back to a default.

Example file: ``config/node.toml``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ConfigError

ENV_PREFIX = "LIVER_NODE_"

# PS3.5 6.2: AE is at most 16 characters of the default repertoire, no backslash or control
# characters; leading/trailing spaces are not significant and all-space is not allowed.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


@dataclass(frozen=True)
class ArchiveSettings:
    """Where the node finds priors and stores its results (the PACS, e.g. Orthanc).

    Attributes
    ----------
    ae_title:
        Called AE title of the archive's DICOM service.
    host, port:
        The archive's DICOM address.
    dicomweb_url:
        Base URL of the archive's DICOMweb service (QIDO-RS/WADO-RS/STOW-RS).
    calling_aet:
        The AE title the node uses when it calls the archive; the archive must know it.
    """

    ae_title: str = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = 4242
    dicomweb_url: str = "http://127.0.0.1:8042/dicom-web"
    calling_aet: str = "LIVERNODE"


@dataclass(frozen=True)
class Settings:
    """Every setting of the node; immutable once loaded.

    Attributes
    ----------
    ae_title:
        The node's own AE title; associations calling another title are rejected.
    host, port:
        Listen address of the node's storage SCP.
    spool_dir:
        Root of the durable spool (``studies/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``
        plus the SQLite index). Relative paths are relative to the working directory.
    stable_seconds:
        A study is complete once no instance of it has arrived for this many seconds.
    allowed_calling_aets:
        Calling AE titles allowed to associate, each ``"AET"`` (from any host) or
        ``"AET@host"`` (only from that IP address); empty means any. Others are rejected.
    workers:
        Number of threads that process complete studies.
    stable_seconds_by_aet:
        Per calling AE ``"AET=seconds"`` overrides of ``stable_seconds`` (like Orthanc's
        StableAge per modality); the study uses the rule of the AE that sent its last instance.
    min_free_bytes:
        C-STORE is refused with 0xA700 (Out of Resources) once the spool's filesystem has less
        free space than this.
    max_associations:
        Concurrent associations accepted per listener process; more are rejected (PS3.8
        7.1.1.9, local limit).
    listener_processes:
        Processes serving associations: the first accepts every connection and hands them
        out in turn, itself included (:mod:`node.ingest.listener`). Python runs one thread at
        a time per process, so with concurrent senders more processes use more cores (2 on a
        2-core machine: 4 associations 280 instead of 185 instances/s). The first process also
        runs the completion monitor, the analysis and the metrics endpoint (which adds up
        every process's counters); limits (``max_associations``,
        ``max_associations_per_host``) hold per process.
    sync_writes:
        fsync each instance before answering Success (default). False: faster, and a crash of
        the node still loses nothing, but a power loss may lose the last acknowledged
        instances (Orthanc's ``SyncStorageArea: false``); only on battery-backed storage.
    max_associations_per_host:
        Concurrent connections one host may hold (0: no limit); more are shut at once, so
        one peer (or a stalled or hostile one) cannot take every slot.
    max_pdu_bytes:
        Maximum PDU length the node receives (PS3.8 D.1); 0 means unlimited.
    max_instance_bytes:
        Larger instances are refused with 0xA700 (Out of Resources).
    network_timeout:
        Seconds a connection may stay silent (also the ACSE timeout, at most 30 s): a peer
        that sends half a PDU and stalls holds an association slot no longer than this.
    metrics_port:
        Port of the HTTP health and Prometheus metrics endpoint; 0 switches it off.
    tls_cert, tls_key, tls_ca:
        PEM files: with cert and key the listener speaks DICOM TLS (PS3.15 B.1); with a CA
        file too, peers must present a certificate signed by it. Empty: plain TCP.
    report_unanalysable:
        When a study cannot be analysed (no usable CT series), send a short SR saying why
        to the archive; otherwise the reason is only logged.
    archive:
        The archive the node talks to.
    """

    ae_title: str = "LIVERNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    spool_dir: Path = Path("spool")
    stable_seconds: float = 10.0
    allowed_calling_aets: tuple[str, ...] = ()
    workers: int = 1
    stable_seconds_by_aet: tuple[str, ...] = ()
    min_free_bytes: int = 256 * 1024 * 1024
    max_associations: int = 16
    listener_processes: int = 1
    max_associations_per_host: int = 8
    sync_writes: bool = True
    max_pdu_bytes: int = 262144
    max_instance_bytes: int = 2 * 1024 * 1024 * 1024
    network_timeout: float = 60.0
    metrics_port: int = 0
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    report_unanalysable: bool = False
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)

    def describe(self) -> str:
        """One line for the start-up log."""
        allowed = ",".join(self.allowed_calling_aets) or "any"
        a = self.archive
        return (
            f"ae={self.ae_title} listen={self.host}:{self.port} spool={self.spool_dir} "
            f"stable_seconds={self.stable_seconds:g} allowed_calling_aets={allowed} "
            f"workers={self.workers} min_free_bytes={self.min_free_bytes} "
            f"max_associations={self.max_associations} "
            f"max_associations_per_host={self.max_associations_per_host} "
            f"sync_writes={self.sync_writes} "
            f"max_pdu_bytes={self.max_pdu_bytes} "
            f"max_instance_bytes={self.max_instance_bytes} metrics_port={self.metrics_port} "
            f"tls={'on' if self.tls_cert else 'off'} "
            f"report_unanalysable={self.report_unanalysable} "
            f"archive={a.ae_title}@{a.host}:{a.port} "
            f"dicomweb={a.dicomweb_url} calling_aet={a.calling_aet}"
        )


_SECTIONS: dict[str, type] = {"archive": ArchiveSettings}


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in _SECTIONS}


def _convert(value: Any, ftype: Any, key: str, source: str) -> Any:
    """Convert ``value`` (TOML value, or string from the environment) to ``ftype``."""
    from_env = isinstance(value, str) and source.startswith("environment")
    where = f"{key!r} (from {source})"
    try:
        if ftype in ("int", int):
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise TypeError
            return int(value)
        if ftype in ("float", float):
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise TypeError
            return float(value)
        if ftype in ("Path", Path):
            if not isinstance(value, str | Path) or not str(value):
                raise TypeError
            return Path(value).expanduser()
        if ftype in ("tuple[str, ...]",):
            if from_env or isinstance(value, str):
                value = [v for v in (p.strip() for p in str(value).split(",")) if v]
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if ftype in ("bool", bool):
            if isinstance(value, bool):
                return value
            if from_env and value.strip().lower() in ("1", "true", "yes", "on", "0", "false",
                                                      "no", "off"):
                return value.strip().lower() in ("1", "true", "yes", "on")
            raise TypeError
        if ftype in ("str", str):
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"bad value {value!r} for {where}: expected {ftype}") from None
    raise ConfigError(f"unsupported setting type {ftype} for {where}")  # programming error


def _merge(
    target: dict[str, Any], section: str | None, key: str, value: Any, source: str
) -> None:
    """Put one converted value into the nested ``target`` dict."""
    cls = _SECTIONS[section] if section else Settings
    fields = _fields(cls)
    dotted = f"{section}.{key}" if section else key
    if key not in fields:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown setting {dotted!r} (from {source}); known: {known}")
    converted = _convert(value, fields[key].type, dotted, source)
    (target.setdefault(section, {}) if section else target)[key] = converted


def _from_mapping(target: dict[str, Any], data: Mapping[str, Any], source: str) -> None:
    """Merge a TOML document or an overrides mapping (nested tables or dotted keys)."""
    for key, value in data.items():
        if value is None:  # a command-line flag that was not given
            continue
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"setting {key!r} (from {source}) must be a table")
            for sub, subvalue in value.items():
                if subvalue is not None:
                    _merge(target, key, sub, subvalue, source)
        elif "." in key:
            section, sub = key.split(".", 1)
            if section not in _SECTIONS:
                raise ConfigError(f"unknown section {section!r} in {key!r} (from {source})")
            _merge(target, section, sub, value, source)
        else:
            _merge(target, None, key, value, source)


def _from_environment(target: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        source = f"environment {name}"
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                _merge(target, section, rest[len(section) + 1 :], value, source)
                break
        else:
            _merge(target, None, rest, value, source)


def stable_by_aet(settings: Settings) -> dict[str, float]:
    """The per calling AE stable times of ``settings.stable_seconds_by_aet``.

    Raises
    ------
    ConfigError
        An entry is not ``AET=seconds`` with a positive number.
    """
    out: dict[str, float] = {}
    for entry in settings.stable_seconds_by_aet:
        aet, _, seconds = entry.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if not aet.strip() or not value > 0:
            raise ConfigError(f"bad stable_seconds_by_aet entry {entry!r}: expected AET=seconds")
        out[aet.strip()] = value
    return out


def _validate(settings: Settings) -> None:
    """Raise ConfigError for values of the right type but outside their domain."""
    a = settings.archive
    for key, ae in [
        ("ae_title", settings.ae_title),
        ("archive.ae_title", a.ae_title),
        ("archive.calling_aet", a.calling_aet),
        *[(f"allowed_calling_aets[{i}]", x.partition("@")[0])
          for i, x in enumerate(settings.allowed_calling_aets)],
    ]:
        if not _AE_RE.match(ae) or not ae.strip():
            raise ConfigError(
                f"bad AE title {ae!r} for {key!r}: 1-16 printable ASCII characters, no backslash"
            )
    for key, port in [("port", settings.port), ("archive.port", a.port)]:
        if not 1 <= port <= 65535:
            raise ConfigError(f"bad port {port} for {key!r}: expected 1-65535")
    if not settings.stable_seconds > 0:
        raise ConfigError(f"bad stable_seconds {settings.stable_seconds}: must be > 0")
    if settings.workers < 1:
        raise ConfigError(f"bad workers {settings.workers}: must be >= 1")
    stable_by_aet(settings)  # raises ConfigError for a malformed entry
    for key in ("min_free_bytes", "max_pdu_bytes", "metrics_port", "max_associations_per_host"):
        if getattr(settings, key) < 0:
            raise ConfigError(f"bad {key} {getattr(settings, key)}: must be >= 0")
    if not settings.network_timeout > 0:
        raise ConfigError(f"bad network_timeout {settings.network_timeout}: must be > 0")
    if settings.max_associations < 1 or settings.max_instance_bytes < 1:
        raise ConfigError("max_associations and max_instance_bytes must be >= 1")
    if settings.listener_processes < 1:
        raise ConfigError(f"bad listener_processes {settings.listener_processes}: must be >= 1")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("tls_cert and tls_key go together: give both or neither")
    if not a.dicomweb_url.startswith(("http://", "https://")):
        raise ConfigError(f"bad archive.dicomweb_url {a.dicomweb_url!r}: expected http(s)://...")
    if not settings.host or not a.host:
        raise ConfigError("host and archive.host must not be empty")


def load_settings(
    path: Path | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load the settings: defaults < TOML file < environment < overrides.

    Parameters
    ----------
    path:
        A TOML file (see ``config/node.toml``), or None for defaults only.
    overrides:
        Values from command-line flags: top-level keys (``"port"``), dotted section keys
        (``"archive.host"``) or nested tables (``{"archive": {"host": ...}}``). ``None`` values
        (flags not given) are ignored.
    environ:
        The environment to read ``LIVER_NODE_*`` variables from; ``os.environ`` by default.

    Returns
    -------
    Settings

    Raises
    ------
    ConfigError
        The file cannot be read or parsed, a key is unknown, or a value is invalid.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                document = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        _from_mapping(values, document, f"file {path}")
    _from_environment(values, os.environ if environ is None else environ)
    _from_mapping(values, overrides or {}, "overrides")

    archive = ArchiveSettings(**values.pop("archive", {}))
    settings = Settings(**values, archive=archive)
    _validate(settings)
    return settings
