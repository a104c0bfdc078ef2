"""Any orientation is accepted: a sagittal or coronal 3D T1 from another session loads as one
volume and registers to the PET where the head really was; the other series of a real exam
show why they are excluded before anyone loads them."""
from __future__ import annotations

import numpy as np
import pytest

from dipnode.dicom_io.errors import GeometryError
from dipnode.node.jobs.pipeline import PetMrPair, align, load_single_series
from dipnode.sim.exam import CORONAL, SAGITTAL, RealisticExam, head_extent, mr_image, write_mr_images


def registration_error_mm(exam: RealisticExam, pet, aligned) -> np.ndarray:
    """Distance between where the registration and the truth put each brain voxel in the MR."""
    idx = np.argwhere(exam.phantom.masks["brain"])[:, ::-1]
    points = pet.geometry.affine @ np.c_[idx, np.ones(len(idx))].T
    return np.linalg.norm(((aligned.alignment.transform - exam.mr_motion) @ points)[:3], axis=0)


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_a_3d_t1_in_any_plane_loads_and_registers(tmp_path, realistic_exam: RealisticExam, plane: str) -> None:
    ex = realistic_exam
    pet = load_single_series(ex.pet_files, "PT")
    if plane == "sagittal":
        files = ex.mr_files["t1"]
    else:
        x, y, z = head_extent(ex.phantom)
        part = mr_image(ex.phantom, ex.mr_motion, CORONAL, (3.0, 3.0, 3.0), (x, z, y))
        files = write_mr_images([part], tmp_path / "cor", study=ex.mr_study, series_uid="1.2.826.0.1.3680043.2.1",
                                series_number=7, description="t1_mprage_cor", image_type=["ORIGINAL", "PRIMARY", "M"],
                                acquisition_type="3D", frame_of_reference_uid=ex.mr_study.frame_of_reference_uid)
    mr = load_single_series(files, "MR")
    normal = mr.geometry.affine[:3, 2] / np.linalg.norm(mr.geometry.affine[:3, 2])
    axis = {"sagittal": SAGITTAL, "coronal": CORONAL}[plane][:, 2]
    assert abs(normal @ (ex.mr_motion[:3, :3] @ axis)) > 0.999  # stacked along the plane's normal
    aligned = align(PetMrPair(pet, mr))
    assert aligned.alignment.method == "rigid" and aligned.alignment.overlap_fraction > 0.95
    err = registration_error_mm(ex, pet, aligned)
    assert err.max() < 1.0, (err.mean(), err.max())  # PET voxels are 4 mm


def test_the_other_series_show_why_they_are_never_the_prior(realistic_exam: RealisticExam) -> None:
    # The localizer cannot even be loaded: the failure the issue saw when it was taken.
    with pytest.raises(GeometryError, match="Rows expected one value for all slices"):
        load_single_series(realistic_exam.mr_files["localizer"], "MR")
    # The DWI loads, silently halved to one b-value per position: only the header facts the
    # index records (repeated positions) keep it out.
    dwi = load_single_series(realistic_exam.mr_files["dwi"], "MR")
    assert dwi.values.shape[0] == len(realistic_exam.mr_files["dwi"]) // 2 and dwi.notes
