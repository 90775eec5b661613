"""Every coded concept the node writes or reads: the ONLY place codes live.

Standard codes come from DCM (PS3.16 Annex D), SNOMED CT (SCT), UCUM and UMLS, as used by
TID 1500 and its sub-templates (PS3.16 TID 1500, 1501, 1410, 1411, 1502, 4108) and by the
Segment Description macro (PS3.3 C.8.20.4). Where DICOM has no code (the volumetric 5-grade
response rule of the source study, "minor response", the report-level volume texts, the contrast
phases, enhancement differences, the viable / necrotic / lipiodol parts of a lesion, the
source study's size pattern and phase behaviour, tumour burden) the node uses its own private
coding scheme :data:`PRIVATE_SCHEME`, whose designator starts with
"99" as PS3.16 8.2 reserves for local schemes, and which every SR declares in its Coding Scheme
Identification Sequence (PS3.3 C.12.1.1.2). The private codes are documented in
``sr_templates/README.md``.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.color import CIELabColor
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from node import ALGORITHM_VERSION, MANUFACTURER
from node.analysis.results import VolumetricResponse
from node.study.model import Phase

# --- Segment Description (PS3.3 C.8.20.4; CID 7150 / 7151 / 4) -------------------------------

#: Segmented Property Category of a lesion (CID 7150). SNOMED's current meaning of 49755003 is
#: "Morphologically abnormal structure"; DICOM and dcmqi use "Morphologically Altered Structure".
CATEGORY_LESION = CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
#: Segmented Property Type of a lesion (CID 7151): metastatic neoplasm.
TYPE_METASTASIS = CodedConcept("14799000", "SCT", "Neoplasm, Metastatic")
#: Segmented Property Category of the liver segment (CID 7150).
CATEGORY_ANATOMY = CodedConcept("91723000", "SCT", "Anatomical Structure")
#: The liver: Segmented Property Type, Anatomic Region and SR Finding Site (CID 4, 7151).
LIVER = CodedConcept("10200004", "SCT", "Liver")
#: Algorithm family of the classical (non-AI) segmentation (CID 7162).
ALGORITHM_FAMILY = CodedConcept("123104", "DCM", "Morphological Operations")

# --- SR: TID 1500 and sub-templates ------------------------------------------------------------

#: Document title of the root container (TID 1500 row 1, CID 7021).
REPORT_TITLE = CodedConcept("126000", "DCM", "Imaging Measurement Report")
#: Observer Type of the device observer, i.e. the algorithm (TID 1002, CID 270).
OBSERVER_DEVICE = CodedConcept("121007", "DCM", "Device")
#: Procedure Reported of TID 1500 (CID 100 is extensible): CT of the abdomen.
PROCEDURE_CT_ABDOMEN = CodedConcept("169070004", "SCT", "Computed tomography of abdomen")
#: Finding (121071, DCM) of a lesion group (TID 1501 row 4).
FINDING_LESION = CodedConcept("52988006", "SCT", "Lesion")
#: Finding category of a lesion group (TID 1501 row 3, CID 7150).
FINDING_CATEGORY_LESION = CATEGORY_LESION
#: Finding category of the liver group.
FINDING_CATEGORY_ANATOMY = CATEGORY_ANATOMY
#: Measurement concept names (TID 1410/1411 rows "Measurement", CID 7469/7470/7471).
VOLUME = CodedConcept("118565006", "SCT", "Volume")
AREA = CodedConcept("42798000", "SCT", "Area")
LONG_AXIS = CodedConcept("103339001", "SCT", "Long axis")
SHORT_AXIS = CodedConcept("103340004", "SCT", "Short axis")
DIAMETER = CodedConcept("81827009", "SCT", "Diameter")
ATTENUATION = CodedConcept("112031", "DCM", "Attenuation Coefficient")
#: Derivations of Attenuation Coefficient (CID 7464 General ROI Measurement Modifiers).
MEAN = CodedConcept("373098007", "SCT", "Mean")
STANDARD_DEVIATION = CodedConcept("386136009", "SCT", "Standard Deviation")
MEDIAN = CodedConcept("373099004", "SCT", "Median")
#: Concept name of the Derivation modifier of a NUM (TID 300 row 3).
DERIVATION = CodedConcept("121401", "DCM", "Derivation")
#: Largest 3D diameter: the longest distance between two points of the lesion (IBSI L0JK,
#: CID 7470 Linear Measurement; IBSI computes it on the ROI's mesh, the node on voxel centres).
MAXIMUM_3D_DIAMETER = CodedConcept("L0JK", "IBSI", "Maximum 3D Diameter of a Mesh")
#: Values of the size pattern (:data:`SIZE_PATTERN`), keyed by ``LesionMeasurement.size_pattern``:
#: homogeneous (< 2 cm), heterogeneous (2-3 cm), necrotic (> 3 cm) enhancement (CID 6335/6343).
SIZE_PATTERN_CODES: dict[str, CodedConcept] = {
    "homogeneous": CodedConcept("112160", "DCM", "Homogeneous"),
    "heterogeneous": CodedConcept("RID6060", "RADLEX", "Heterogeneous"),
    "necrotic": CodedConcept("6574001", "SCT", "Necrosis"),
}
#: Concept names the reader looks for (TID 1500 structure, TID 4108, TID 1411 row 8).
IMAGING_MEASUREMENTS = CodedConcept("126010", "DCM", "Imaging Measurements")
MEASUREMENT_GROUP = CodedConcept("125007", "DCM", "Measurement Group")
TRACKING_IDENTIFIER = CodedConcept("112039", "DCM", "Tracking Identifier")
TRACKING_UID = CodedConcept("112040", "DCM", "Tracking Unique Identifier")
REFERENCED_SEGMENT = CodedConcept("121191", "DCM", "Referenced Segment")
FINDING = CodedConcept("121071", "DCM", "Finding")
#: Report-level qualitative evaluations container (TID 1500 row 10: CODE or TEXT children).
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
#: Concept name of the response category (value: one of :data:`RESPONSE_CODES`).
CURRENT_RESPONSE = CodedConcept("112048", "DCM", "Current Response")
#: Concept name of the rule that produced it (value: :data:`VOLUMETRIC_RULE`).
RESPONSE_METHOD = CodedConcept("112021", "DCM", "Response Evaluation Method")
#: Free-text comment: the research-use disclaimer and algorithm identification.
COMMENT = CodedConcept("121106", "DCM", "Comment")

# --- Units (UCUM, PS3.16 CID 7181 / 82) --------------------------------------------------------

#: Millilitre is not in pydicom's UCUM dictionary.
UNIT_ML = CodedConcept("ml", "UCUM", "milliliter")
UNIT_MM3 = CodedConcept("mm3", "UCUM", "cubic millimeter")
UNIT_MM2 = CodedConcept("mm2", "UCUM", "square millimeter")
UNIT_MM = CodedConcept("mm", "UCUM", "millimeter")
UNIT_CM = CodedConcept("cm", "UCUM", "centimeter")
UNIT_CM3 = CodedConcept("cm3", "UCUM", "cubic centimeter")
UNIT_HU = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
UNIT_PERCENT = CodedConcept("%", "UCUM", "Percent")

# --- Equipment ---------------------------------------------------------------------------------

#: Purpose of Reference of the node's Contributing Equipment item (CID 7005).
PROCESSING_EQUIPMENT = CodedConcept(
    codes.DCM.ProcessingEquipment.value,
    codes.DCM.ProcessingEquipment.scheme_designator,
    codes.DCM.ProcessingEquipment.meaning,
)

# --- The project's private coding scheme (PS3.16 8.2) -------------------------------------------

#: Coding Scheme Designator of the private scheme ("99" prefix = local scheme, SH <= 16 chars).
PRIVATE_SCHEME = "99LIVERNODE"


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


#: The response rule: total liver-metastasis volume, follow-up vs prior, five grades.
VOLUMETRIC_RULE = _private("LN-VOLRULE", "Volumetric 5-grade liver metastasis response")
#: Response categories of the volumetric rule.
RESPONSE_CODES: dict[VolumetricResponse, CodedConcept] = {
    VolumetricResponse.CR: _private("LN-VR-CR", "Volumetric complete response"),
    VolumetricResponse.PR: _private("LN-VR-PR", "Volumetric partial response"),
    VolumetricResponse.MR: _private("LN-VR-MR", "Volumetric minor response"),
    VolumetricResponse.SD: _private("LN-VR-SD", "Volumetric stable disease"),
    VolumetricResponse.PD: _private("LN-VR-PD", "Volumetric progressive disease"),
}
#: Concept names of the TEXT qualitative evaluations of the response.
PRIOR_TOTAL_VOLUME = _private("LN-PRIORVOL", "Prior total metastasis volume")
CURRENT_TOTAL_VOLUME = _private("LN-CURVOL", "Current total metastasis volume")
VOLUME_CHANGE = _private("LN-VOLCHANGE", "Total metastasis volume change")
PRIOR_STUDY_UID = _private("LN-PRIORSTUDY", "Prior study instance UID")
NEW_LESIONS = _private("LN-NEWLES", "Number of new lesions")
VANISHED_LESIONS = _private("LN-VANISHED", "Vanished lesions")
LIVER_VOLUME_TEXT = _private("LN-LIVERVOL", "Liver volume")

#: Contrast phase of a per-phase value: concept name of a HAS CONCEPT MOD CODE item under the
#: NUM (or CODE) it qualifies; values keyed by ``Phase.value`` (the keys of the per-phase dicts
#: of ``LesionMeasurement``). No DCM / SCT code for CT contrast phases was found.
CONTRAST_PHASE = _private("LN-PHASE", "Contrast phase")
PHASE_CODES: dict[str, CodedConcept] = {
    Phase.NATIVE.value: _private("LN-PH-NATIVE", "Plain (non-contrast) phase"),
    Phase.ARTERIAL.value: _private("LN-PH-ART", "Arterial phase"),
    Phase.PORTAL_VENOUS.value: _private("LN-PH-PV", "Portal venous phase"),
    Phase.DELAYED.value: _private("LN-PH-DEL", "Delayed phase"),
    Phase.UNKNOWN.value: _private("LN-PH-UNK", "Contrast phase not determined"),
}
#: Per-phase HU differences (NUM, [hnsf'U], with a Contrast phase modifier).
ENHANCEMENT_VS_NATIVE = _private("LN-ENH-NATIVE", "Enhancement relative to plain scan")
ENHANCEMENT_VS_LIVER = _private("LN-ENH-LIVER", "Attenuation difference to liver")
#: Parts of a lesion's volume (NUM, ml) and the necrotic share (NUM, %).
VIABLE_VOLUME = _private("LN-VIABLEVOL", "Viable (enhancing) tumour volume")
NECROTIC_VOLUME = _private("LN-NECROVOL", "Necrotic (non-enhancing) tumour volume")
NECROTIC_FRACTION = _private("LN-NECROFRAC", "Necrotic fraction of tumour volume")
LIPIODOL_VOLUME = _private("LN-LIPVOL", "Lipiodol deposit volume")
#: Size pattern of the source study (CODE, value from :data:`SIZE_PATTERN_CODES`).
SIZE_PATTERN = _private("LN-SIZEPAT", "Size pattern")
#: Phase behaviour: the viable part's attenuation against the liver, one CODE item per phase.
#: The phase is in the concept name (not a modifier) because dcmqi drops modifiers of CODE items.
PHASE_BEHAVIOUR: dict[str, CodedConcept] = {
    Phase.NATIVE.value: _private("LN-BEH-NATIVE", "Plain scan attenuation relative to liver"),
    Phase.ARTERIAL.value: _private("LN-BEH-ART", "Arterial phase attenuation relative to liver"),
    Phase.PORTAL_VENOUS.value: _private("LN-BEH-PV",
                                        "Portal venous phase attenuation relative to liver"),
    Phase.DELAYED.value: _private("LN-BEH-DEL", "Delayed phase attenuation relative to liver"),
    Phase.UNKNOWN.value: _private("LN-BEH-UNK", "Attenuation relative to liver, phase unknown"),
}
#: Values of the phase behaviour, keyed by ``LesionMeasurement.phase_behaviour`` values.
BEHAVIOUR_CODES: dict[str, CodedConcept] = {
    "hyper": _private("LN-HYPER", "Hyperattenuating to liver"),
    "iso": _private("LN-ISO", "Isoattenuating to liver"),
    "hypo": _private("LN-HYPO", "Hypoattenuating to liver"),
}
#: Per patient, in the liver's volumetric group: all lesions together (NUM, ml / %).
TOTAL_TUMOUR_VOLUME = _private("LN-TUMVOL", "Total liver tumour volume")
TUMOUR_BURDEN = _private("LN-BURDEN", "Tumour burden (tumour / liver volume)")

#: How a phase was aligned onto the reference, and what misalignment remains (TEXT).
PHASE_ALIGNMENT = _private("LN-ALIGN", "Phase alignment and residual misalignment")

#: Every private concept, for documentation and tests.
PRIVATE_CODES: tuple[CodedConcept, ...] = (
    VOLUMETRIC_RULE,
    *RESPONSE_CODES.values(),
    PRIOR_TOTAL_VOLUME,
    CURRENT_TOTAL_VOLUME,
    VOLUME_CHANGE,
    PRIOR_STUDY_UID,
    NEW_LESIONS,
    VANISHED_LESIONS,
    LIVER_VOLUME_TEXT,
    PHASE_ALIGNMENT,
    CONTRAST_PHASE,
    *PHASE_CODES.values(),
    ENHANCEMENT_VS_NATIVE,
    ENHANCEMENT_VS_LIVER,
    VIABLE_VOLUME,
    NECROTIC_VOLUME,
    NECROTIC_FRACTION,
    LIPIODOL_VOLUME,
    SIZE_PATTERN,
    *PHASE_BEHAVIOUR.values(),
    *BEHAVIOUR_CODES.values(),
    TOTAL_TUMOUR_VOLUME,
    TUMOUR_BURDEN,
)


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """Return the Coding Scheme Identification item of the private scheme (PS3.3 C.12.1.1.2)."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="liver-node private codes",
        version=ALGORITHM_VERSION,
        responsible_organization=MANUFACTURER,
    )


# --- Display colours (PS3.3 C.8.20.2.1 Recommended Display CIELab Value) -------------------------

LIVER_COLOR = CIELabColor(55.0, 25.0, 35.0)  # brownish
_LESION_COLORS = (
    CIELabColor(55.0, 75.0, 60.0),  # red
    CIELabColor(88.0, -5.0, 85.0),  # yellow
    CIELabColor(60.0, -20.0, -45.0),  # blue
    CIELabColor(50.0, 70.0, -50.0),  # magenta
    CIELabColor(85.0, -70.0, 70.0),  # green
    CIELabColor(70.0, 35.0, 70.0),  # orange
)


def lesion_color(label: int) -> CIELabColor:
    """Display colour of the lesion with label ``label`` (1-based), cycling a fixed palette."""
    return _LESION_COLORS[(label - 1) % len(_LESION_COLORS)]

# --- The "not analysable" report ---------------------------------------------------------------

#: Root of the short report sent when a study cannot be analysed (LOINC "Diagnostic imaging
#: study report"; not a TID 1500 report, which needs measurements).
NOT_ANALYSABLE_TITLE = CodedConcept("18748-4", "LN", "Diagnostic imaging report")
#: Its finding: the study could not be analysed; the reason follows as TEXT.
FINDING_TEXT = CodedConcept("121071", "DCM", "Finding")
