"""liver-node: a DICOM node for multi-phase liver CT volumetry of liver metastases.

Research use only. Not a medical device; results are not clinically validated.
"""

__version__ = "0.1.0"

#: Name of the algorithm, written into Contributing Equipment / Algorithm Identification of
#: every output object.
ALGORITHM_NAME = "liver-node classical liver/lesion segmentation"
ALGORITHM_VERSION = __version__
MANUFACTURER = "liver-node project"
#: Shown in every output's series description and in the SR, so nobody mistakes the output
#: for a validated clinical measurement.
RESEARCH_DISCLAIMER = "RESEARCH USE ONLY - not clinically validated"
