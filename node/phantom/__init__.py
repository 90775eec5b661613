"""Synthetic multi-phase liver CT studies with ground truth (the node's test patients).

A phantom study is what a 64-slice CT scanner following the source study's protocol would send
(80 kV, 5 mm slices; native, arterial 22 s, portal venous 50 s and delayed 150 s after an
iohexol bolus), plus the truth the node's measurements are checked against. Nothing here comes
from ``node.analysis``: the ground truth is analytic.

Layout of a study directory::

    dicom/<phase>/<NNNN>.dcm   phase in native, arterial, portal_venous, delayed; CT Image
                               Storage, Explicit VR Little Endian, NNNN = InstanceNumber
                               (instance 1 = most superior slice)
    truth.json                 see below
    truth_labels.npz           "lesions": uint8 label map, "liver": bool mask, both on the
                               portal venous grid, shape (slices, rows, cols), slice 0 = the
                               most inferior (lowest z) slice

truth.json::

    patient_id, patient_name, study_instance_uid, study_date, frame_of_reference_uid
    series:       {phase: SeriesInstanceUID}
    shift_mm:     {phase: [dx, dy, dz]}  rigid anatomy displacement of that phase relative to
                  the portal venous phase (breathing); portal_venous is [0, 0, 0]
    liver_volume_ml   continuous volume of the liver envelope (parenchyma, intrahepatic
                      vessels and lesions; not the IVC nor the extrahepatic portal vein);
                      the "liver" mask is this envelope's >= 50 % occupancy per voxel
    lesions: [{
        truth_id         "T1", ... stable across time points
        label            value in the "lesions" label map (0 if vanished); a voxel has the
                         label where the lesion occupies >= 50 % of it
        center_xyz       lesion centre, patient LPS mm, in the portal venous series' frame
        diameter_mm      equivalent-sphere diameter of volume_ml
        longest_axial_diameter_mm  longest in-plane diameter over all axial planes
        volume_ml        exact continuous volume (analytic quadrature, not a voxel count);
                         includes necrotic areas and lipiodol
        status           "present" | "new" | "vanished"
        prior_volume_ml  volume in the prior study (0 for new lesions; null in a baseline)
        lipiodol         bool: the lesion holds lipiodol deposits (after TACE)
    }]
    total_volume_ml   sum of the lesion volumes
    grid              {origin_xyz, pixel_spacing_mm, slice_thickness_mm, shape}
    hu_table          {tissue: {phase: HU}} drawn for this study
    phantom           generator parameters (anatomy seed, lesion shapes) for follow-ups
    follow-ups only:
    prior_study_instance_uid, prior_total_volume_ml,
    volume_change_fraction   total / prior total - 1
    category                 "CR" | "PR" | "MR" | "SD" | "PD", the source study's
                             volumetric rule (see :func:`volumetric_category`)
"""

from node.phantom.followup import generate_follow_up
from node.phantom.generator import generate_baseline
from node.phantom.truth import load_truth, load_truth_labels, volumetric_category

__all__ = [
    "generate_baseline",
    "generate_follow_up",
    "load_truth",
    "load_truth_labels",
    "volumetric_category",
]
