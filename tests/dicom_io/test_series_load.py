"""Series to volume: ordering, affine, rescale and every refusal the loader promises."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dipnode.dicom_io.errors import (
    DicomInputError,
    GeometryError,
    MixedSeriesError,
    UnsupportedImageError,
    UnsupportedPetError,
)
from dipnode.dicom_io.series import load_series_dir, load_volume, read_datasets, read_files, split_series
from dipnode.sim.dicom_study import write_mr_series, write_pet_series


@pytest.fixture
def pet(tmp_path: Path, study, axial_affine, pet_values) -> tuple[np.ndarray, list[Path]]:
    values = pet_values((6, 8, 16))
    return values, write_pet_series(values, axial_affine, tmp_path / "pt", study=study)


def _datasets(paths: list[Path]) -> list[Dataset]:
    return read_datasets(paths)


def test_round_trip_within_per_slice_quantisation(pet, axial_affine) -> None:
    values, paths = pet
    vol = load_volume(_datasets(paths), modality="PT")
    assert vol.values.dtype == np.float32 and vol.values.shape == values.shape
    # per-slice slope: error relative to each slice's maximum
    rel = np.max(np.abs(vol.values - values), axis=(1, 2)) / np.max(values, axis=(1, 2))
    assert np.all(rel < 1e-4)
    slopes = {float(h.RescaleSlope) for h in vol.headers}
    assert len(slopes) == values.shape[0]  # the writer really scaled slices separately
    np.testing.assert_allclose(vol.geometry.affine, axial_affine, atol=1e-5)
    assert vol.units == "BQML" and vol.modality == "PT"
    assert all("PixelData" not in h for h in vol.headers)


def test_reversed_file_order_reads_the_same_volume(pet) -> None:
    _, paths = pet
    forward = load_volume(_datasets(paths))
    backward = load_volume(_datasets(paths[::-1]))
    np.testing.assert_array_equal(forward.values, backward.values)
    np.testing.assert_array_equal(forward.geometry.affine, backward.geometry.affine)
    assert forward.sop_instance_uids == backward.sop_instance_uids


def test_slices_sorted_by_position_not_instance_number(pet) -> None:
    _, paths = pet
    dss = _datasets(paths)
    for ds, n in zip(dss, range(len(dss), 0, -1)):
        ds.InstanceNumber = n  # scrambled numbering must not change the order
    vol = load_volume(dss)
    z = [float(h.ImagePositionPatient[2]) for h in vol.headers]
    assert z == sorted(z)


def test_oblique_orientation_gives_the_affine(tmp_path: Path, study, oblique_affine, pet_values) -> None:
    values = pet_values((5, 8, 12))
    paths = write_mr_series(values, oblique_affine, tmp_path, study=study)
    vol = load_volume(read_datasets(paths[::-1]), modality="MR")
    np.testing.assert_allclose(vol.geometry.affine, oblique_affine, atol=1e-5)
    assert vol.geometry.spacing == pytest.approx((3.0, 2.5, 2.0))
    # the MR writer scales to 12 bits; the shape of the data must survive
    corr = np.corrcoef(vol.values.ravel(), values.ravel())[0, 1]
    assert corr > 0.9999


def test_uneven_spacing_refused(pet) -> None:
    _, paths = pet
    dss = _datasets(paths)
    dss[3].ImagePositionPatient[2] = float(dss[3].ImagePositionPatient[2]) + 1.0
    with pytest.raises(GeometryError, match="uneven spacing"):
        load_volume(dss)


def test_missing_slice_refused_as_gap(pet) -> None:
    _, paths = pet
    dss = _datasets(paths)
    del dss[2]
    with pytest.raises(GeometryError, match="missing slice"):
        load_volume(dss)


def test_duplicate_positions_dropped_with_note(pet) -> None:
    values, paths = pet
    dss = _datasets(paths)
    dup = _datasets([paths[2]])[0]
    dup.SOPInstanceUID = dup.SOPInstanceUID + ".9"
    vol = load_volume([*dss, dup])
    assert vol.values.shape == values.shape
    assert len(vol.notes) == 1 and "duplicate slice position" in vol.notes[0]
    assert dup.SOPInstanceUID in vol.notes[0]


def test_mixed_series_split_and_refused_together(tmp_path: Path, study, axial_affine, pet_values) -> None:
    pt = write_pet_series(pet_values((3, 4, 4)), axial_affine, tmp_path, study=study, series_number=1)
    mr = write_mr_series(pet_values((4, 4, 4)), axial_affine, tmp_path, study=study, series_number=2)
    (tmp_path / "notes.txt").write_text("not dicom")
    report = read_files(sorted(tmp_path.iterdir()))
    assert len(report.datasets) == 7
    assert [p.name for p, _ in report.skipped] == ["notes.txt"]
    groups = split_series(report.datasets)
    assert sorted(len(g) for g in groups.values()) == [3, 4]
    vols = load_series_dir(tmp_path)
    assert [v.modality for v in vols] == ["PT", "MR"]
    assert [v.values.shape[0] for v in vols] == [3, 4]
    with pytest.raises(MixedSeriesError, match="one series"):
        load_volume(report.datasets)
    with pytest.raises(MixedSeriesError, match="Modality expected PT, got MR"):
        load_volume(groups[read_datasets(mr[:1])[0].SeriesInstanceUID], modality="PT")
    assert pt  # written


def test_dicomdir_ignored(pet, tmp_path: Path) -> None:
    _, paths = pet
    fake = _datasets(paths[:1])[0]
    fake.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    target = tmp_path / "DICOMDIR"
    fake.save_as(target, enforce_file_format=True)
    report = read_files([target, *paths])
    assert len(report.datasets) == len(paths)
    assert "DICOMDIR" in report.skipped[0][1]


def test_cnts_units_refused(tmp_path: Path, study, axial_affine, pet_values) -> None:
    paths = write_pet_series(pet_values((3, 4, 4)), axial_affine, tmp_path, study=study, units="CNTS")
    with pytest.raises(UnsupportedPetError, match="Units expected BQML, got CNTS"):
        load_volume(read_datasets(paths))


def test_dynamic_series_type_refused(tmp_path: Path, study, axial_affine, pet_values) -> None:
    paths = write_pet_series(pet_values((3, 4, 4)), axial_affine, tmp_path, study=study,
                             series_type=("DYNAMIC", "IMAGE"))
    with pytest.raises(UnsupportedPetError, match="DYNAMIC"):
        load_volume(read_datasets(paths))


def test_dynamic_frames_by_repeated_positions_refused(pet) -> None:
    _, paths = pet
    frame2 = _datasets(paths)
    for ds in frame2:
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".2"
        ds.FrameReferenceTime = 300000.0
    with pytest.raises(UnsupportedPetError, match="FrameReferenceTime"):
        load_volume(_datasets(paths) + frame2)


def test_time_slices_refused(pet) -> None:
    _, paths = pet
    dss = _datasets(paths)
    for ds in dss:
        ds.NumberOfTimeSlices = 4
    with pytest.raises(UnsupportedPetError, match="NumberOfTimeSlices expected 1 .*got 4"):
        load_volume(dss)


def test_gantry_tilt_refused(pet) -> None:
    _, paths = pet
    dss = _datasets(paths)
    dss[0].GantryDetectorTilt = 12.0
    with pytest.raises(GeometryError, match="GantryDetectorTilt"):
        load_volume(dss)


def test_sheared_stack_refused(pet) -> None:
    _, paths = pet
    dss = _datasets(paths)
    for k, ds in enumerate(dss):  # positions drift in x with z: a tilted acquisition
        ds.ImagePositionPatient[0] = float(ds.ImagePositionPatient[0]) + 0.5 * k
    with pytest.raises(GeometryError, match="in-plane drift"):
        load_volume(dss)


def test_mixed_orientation_refused(pet) -> None:
    _, paths = pet
    dss = _datasets(paths)
    dss[1].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(GeometryError, match="ImageOrientationPatient"):
        load_volume(dss)


@pytest.mark.parametrize("name,value", [("PixelSpacing", [2.0, 2.5]), ("Rows", 9)])
def test_inconsistent_grid_refused(pet, name: str, value: object) -> None:
    _, paths = pet
    dss = _datasets(paths)
    setattr(dss[4], name, value)
    with pytest.raises(GeometryError, match=name):
        load_volume(dss)


def test_one_slice_refused(pet) -> None:
    _, paths = pet
    with pytest.raises(GeometryError, match="got 1"):
        load_volume(_datasets(paths[:1]))


def test_multiframe_refused_clearly(pet) -> None:
    _, paths = pet
    dss = _datasets(paths)
    dss[0].NumberOfFrames = 2
    with pytest.raises(UnsupportedImageError, match="NumberOfFrames"):
        load_volume(dss)


def test_empty_input_refused() -> None:
    with pytest.raises(DicomInputError, match="got 0"):
        load_volume([])
