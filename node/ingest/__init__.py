"""Network in: the storage SCP, the durable spool and study-complete detection."""

from node.ingest.server import NodeServer
from node.ingest.spool import Spool, StudyState, request_analysis, study_record

__all__ = ["NodeServer", "Spool", "StudyState", "request_analysis", "study_record"]
