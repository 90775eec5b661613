"""Exceptions of the node: one root, a few subclasses."""


class NodeError(Exception):
    """Root of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The configuration is invalid."""


class IngestError(NodeError):
    """An incoming instance cannot be accepted or stored."""


class StudyError(NodeError):
    """A study cannot be assembled into usable volumes."""


class AnalysisError(NodeError):
    """Segmentation or measurement failed."""


class ArchiveError(NodeError):
    """Talking to the archive (PACS) failed."""
