"""Names a PACS user and a report reader see: Series Descriptions and the demo's folders."""
from __future__ import annotations

import pytest

from dipnode.dicom_io.provenance import RESEARCH_SUFFIX
from dipnode.models.params import PRESETS, Method
from dipnode.node.cli.demo import output_folder_names
from dipnode.node.jobs.pipeline import OutputOptions, series_descriptions
from dipnode.node.settings import OutputSettings, Settings


def test_descriptions_read_well_and_name_the_method() -> None:
    # Before: "SDIP SDIP a0.6 [RESEARCH]" for the PET and "SDIP SDIP a0.6 stability map" for the map.
    prefix = OutputSettings().description_prefix
    assert prefix == OutputOptions.from_settings().description_prefix == "dipnode"
    assert series_descriptions(prefix, Method.SDIP, PRESETS["paper"]) == {
        "pet": "dipnode PET SDIP a0.6", "map": "dipnode stability map",
        "map-plain": "dipnode stability map Bq/ml", "weight": "dipnode data weight",
        "weight-plain": "dipnode data weight %"}
    assert series_descriptions(prefix, Method.SDIP_PAPER, PRESETS["paper"])["pet"] == "dipnode PET SDIP-paper a0.6"
    assert series_descriptions(prefix, Method.CDIP, PRESETS["paper"])["pet"] == "dipnode PET cDIP"
    assert series_descriptions(prefix, Method.GAUSSIAN, PRESETS["paper"])["pet"] == "dipnode PET Gaussian 2 vx"
    assert series_descriptions("", Method.SDIP, PRESETS["paper"].replace(alpha=1.25))["pet"] == "PET SDIP a1.25"


@pytest.mark.parametrize("method", list(Method))
def test_descriptions_fit_lo_with_the_longest_prefix(method: Method) -> None:
    # LO is at most 64 characters (PS3.5 6.2) and the writers cut the text before the research
    # label to make room: with the longest prefix the setting allows (32) nothing is cut.
    params = PRESETS["paper"].replace(alpha=0.123456, fwhm_voxels=12.345678)
    for text in series_descriptions("P" * 32, method, params).values():
        assert len(text) + len(RESEARCH_SUFFIX) <= 64, text


def test_demo_folders_are_named_for_what_they_hold() -> None:
    settings = Settings(node={"allowed_calling_aets": ["SCANNER"]})
    assert output_folder_names(settings, "sdip") == {
        1001: "pet-sdip", 1002: "stability-map", 1003: "stability-map-plain", 1004: "data-weight",
        1005: "data-weight-plain"}
    no_plain = Settings(node={"allowed_calling_aets": ["SCANNER"]},
                        output={"series_number_map_plain": 0, "series_number_weight_plain": 0})
    assert output_folder_names(no_plain, "sdip") == {1001: "pet-sdip", 1002: "stability-map",
                                                     1004: "data-weight"}


def test_output_numbers_have_one_home_the_settings() -> None:
    # Before: OutputOptions had its own defaults (1001/1002/0), the settings 1001/1002/1003.
    s = OutputSettings()
    o = OutputOptions.from_settings()
    numbers = (o.series_number_pet, o.series_number_map, o.series_number_map_plain,
               o.series_number_weight, o.series_number_weight_plain)
    assert numbers == (s.series_number_pet, s.series_number_map, s.series_number_map_plain,
                       s.series_number_weight, s.series_number_weight_plain) == (1001, 1002, 1003, 1004, 1005)
    second = OutputOptions.from_settings(s, study_job_index=1, uid_seed="x")
    assert (second.series_number_pet, second.series_number_weight_plain, second.uid_seed) == (1006, 1010, "x")
    no_plain = OutputOptions.from_settings(OutputSettings(series_number_map_plain=0))
    assert no_plain.series_number_map_plain == 0
