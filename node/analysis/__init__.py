"""Analysis: liver, lesions, measurements, tracking and response; arrays in, records out.

This package never imports ``node.ingest``, ``node.archive`` or ``node.phantom``.
"""

from node.analysis.response import assess_response, classify_volumetric
from node.analysis.run import analyze

__all__ = ["analyze", "assess_response", "classify_volumetric"]
