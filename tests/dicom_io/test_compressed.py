"""Compressed transfer syntaxes decode to the same values as the uncompressed series."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from dipnode.dicom_io.series import load_series_dir
from dipnode.sim.dicom_study import write_pet_series


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless, JPEGLSLossless])
def test_lossless_series_decodes_identically(syntax: str, tmp_path: Path, study, axial_affine,
                                             pet_values, dciodvfy_errors) -> None:
    # 32 x 32 in-plane: OpenJPEG's default 6 wavelet levels need at least 2**5 pixels a side.
    values = pet_values((3, 32, 32))
    write_pet_series(values, axial_affine, tmp_path / "plain", study=study)
    paths = write_pet_series(values, axial_affine, tmp_path / "packed", study=study,
                             transfer_syntax=syntax)
    assert dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    assert dciodvfy_errors(paths[0]) == []
    plain = load_series_dir(tmp_path / "plain")[0]
    packed = load_series_dir(tmp_path / "packed")[0]
    np.testing.assert_array_equal(packed.values, plain.values)
    np.testing.assert_array_equal(packed.geometry.affine, plain.geometry.affine)
