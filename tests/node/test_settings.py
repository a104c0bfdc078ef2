import re
from pathlib import Path

import pytest

from dipnode.models.params import Method, preset
from dipnode.node.settings import (
    SettingsError, example_settings_toml, load_settings,
)

MINIMAL = '[node]\nallowed_calling_aets = ["PACS"]\n'


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("DIPNODE_"):
            monkeypatch.delenv(k)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "dipnode.toml"
    p.write_text(text)
    return p


def test_toml_values_are_read(tmp_path):
    s = load_settings(write(tmp_path, """
[node]
ae_title = "MYNODE"
port = 11113
allowed_calling_aets = ["PACS", "SCANNER1"]
[matching]
fallback = "fail"
[[destinations]]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
[method]
preset = "tiny"
alpha = 1.5
"""))
    assert s.node.ae_title == "MYNODE" and s.node.port == 11113
    assert s.node.allowed_calling_aets == ["PACS", "SCANNER1"]
    assert s.matching.fallback == "fail"
    assert [d.label for d in s.destinations] == ["ORTHANC@127.0.0.1:4242"]
    assert s.dip_params() == preset("tiny").replace(alpha=1.5, device="auto")
    assert s.calling_ae == "MYNODE"  # defaults to the node's own title


def test_environment_overrides_one_key_of_a_section(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPNODE_NODE__PORT", "2104")
    monkeypatch.setenv("DIPNODE_METHOD__EPOCHS", "300")
    monkeypatch.setenv("DIPNODE_NODE__ALLOWED_CALLING_AETS", '["OTHER"]')
    s = load_settings(write(tmp_path, MINIMAL + 'ae_title = "FROMFILE"\nport = 9999\n'))
    assert s.node.port == 2104
    assert s.node.ae_title == "FROMFILE"  # the rest of the section still comes from the file
    assert s.node.allowed_calling_aets == ["OTHER"]
    # models.params.resolve_params: epochs without sample_from samples the second half.
    assert s.dip_params().epochs == 300 and s.dip_params().sample_from == 150


def test_no_file_uses_environment_and_defaults(monkeypatch):
    monkeypatch.setenv("DIPNODE_NODE__ALLOWED_CALLING_AETS", '["*"]')
    s = load_settings(None)
    assert s.node.accepts_any_caller() and s.node.host == "127.0.0.1" and s.node.port == 11112
    assert s.output.series_number_pet == 1001 and s.output.research is True
    assert s.dip_params() == preset("paper")


def test_calling_aets_must_be_explicit(tmp_path):
    with pytest.raises(SettingsError, match=r"node\.allowed_calling_aets: expected a value"):
        load_settings(write(tmp_path, '[node]\nport = 104\n'))


@pytest.mark.parametrize("body,key,fragment", [
    ('[node]\nallowed_calling_aets=["A"]\nport = 70000\n', "node.port", "70000"),
    ('[node]\nallowed_calling_aets=["A"]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', "node.ae_title", "expected 1-16 characters"),
    ('[node]\nallowed_calling_aets=["A\\\\B"]\n', "node.allowed_calling_aets", "backslash"),
    ('[node]\nallowed_calling_aets=["*", "PACS"]\n', "node.allowed_calling_aets", '["*"]'),
    (MINIMAL + '[matching]\nfallback = "pray"\n', "matching.fallback", "pray"),
    (MINIMAL + '[matching]\nmr_description_patterns = ["T1(", "x"]\n', "matching.mr_description_patterns", "T1("),
    (MINIMAL + '[method]\npreset = "huge"\n', "method.preset", "huge"),
    (MINIMAL + '[method]\nsample_from = 500\n', "method", "sample_from"),
    (MINIMAL + '[method]\nname = "cdip"\nalpha = 0.6\n', "method", "alpha"),
    (MINIMAL + '[output]\nseries_number_map = 1001\n', "output", "distinct"),
    (MINIMAL + '[sender]\nbackoff_s = 10\nbackoff_max_s = 1\n', "sender", "backoff_max_s"),
    (MINIMAL + '[workers]\ndevice = "tpu"\n', "workers.device", "tpu"),
    (MINIMAL + '[node.extra]\n', "node.extra", "unknown setting"),
    (MINIMAL + '[sereis]\nstable_age_s = 1\n', "sereis", "unknown setting"),
])
def test_bad_values_name_key_expected_and_actual(tmp_path, body, key, fragment):
    with pytest.raises(SettingsError) as e:
        load_settings(write(tmp_path, body))
    msg = str(e.value)
    assert re.search(rf"^  {re.escape(key)}\S*: ", msg, re.M), msg
    assert "expected" in msg and fragment in msg, msg


def test_bad_env_value_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPNODE_SERIES__STABLE_AGE_S", "-3")
    with pytest.raises(SettingsError, match=r"series\.stable_age_s: .*greater than 0.*-3"):
        load_settings(write(tmp_path, MINIMAL))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SettingsError, match="expected an existing TOML file"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(SettingsError, match="expected valid TOML"):
        load_settings(write(tmp_path, "[node\n"))


def test_zero_series_number_means_not_written(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL + "[output]\nseries_number_map_plain = 0\n"))
    assert s.output.series_number_map_plain is None


def test_data_weight_series_default_on_and_sdip_paper_selectable(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL))
    assert (s.output.series_number_weight, s.output.series_number_weight_plain) == (1004, 1005)
    assert s.method.name is Method.SDIP  # the guarded method by default
    s = load_settings(write(tmp_path, MINIMAL + '[method]\nname = "sdip-paper"\n'
                            '[output]\nseries_number_weight_plain = 0\n'))
    assert s.method.name is Method.SDIP_PAPER and s.output.series_number_weight_plain is None
    with pytest.raises(SettingsError, match="distinct"):
        load_settings(write(tmp_path, MINIMAL + "[output]\nseries_number_weight = 1002\n"))


def test_cdip_forces_alpha_zero_and_method_device_wins(tmp_path):
    body = MINIMAL + '[method]\nname = "cdip"\ndevice = "cpu"\n[workers]\ndevice = "cuda:1"\n'
    s = load_settings(write(tmp_path, body))
    assert s.method.name is Method.CDIP
    assert s.dip_params().alpha == 0.0 and s.dip_params().device == "cpu"


def test_settings_are_immutable(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL))
    with pytest.raises(Exception):
        s.node.port = 1  # type: ignore[misc]


def test_ae_title_padding_is_not_significant(tmp_path):
    s = load_settings(write(tmp_path, '[node]\nallowed_calling_aets = ["  PACS "]\nae_title = " ME"\n'))
    assert s.node.allowed_calling_aets == ["PACS"] and s.node.ae_title == "ME"
    with pytest.raises(SettingsError, match="non-space"):
        load_settings(write(tmp_path, '[node]\nallowed_calling_aets = ["*"]\nae_title = "    "\n'))


def test_example_file_makes_the_admin_list_the_callers(tmp_path):
    # The example accepts no caller until the admin writes the list: no ["*"] by copy-paste.
    with pytest.raises(SettingsError, match=r"node.allowed_calling_aets: expected a value"):
        load_settings(write(tmp_path, example_settings_toml()))


def test_example_file_loads_and_its_commented_defaults_are_the_defaults(tmp_path, monkeypatch):
    text = example_settings_toml()
    monkeypatch.setenv("DIPNODE_NODE__ALLOWED_CALLING_AETS", '["ORTHANC", "PETMR1"]')
    as_is = load_settings(write(tmp_path, text))
    monkeypatch.delenv("DIPNODE_NODE__ALLOWED_CALLING_AETS")
    # Uncomment every "# key = value" line outside the destination example: the documented
    # defaults must be the real defaults.
    head, sep, tail = text.partition("# [[destinations]]")
    head = re.sub(r"(?m)^# ([a-z_]+ = .*?)(\s{2,}#.*)?$", r"\1", head)
    tail_sections = tail.partition("\n[sender]\n")  # the section, not a "[sender] tls" comment
    tail = sep + tail_sections[0] + re.sub(
        r"(?m)^# ([a-z_]+ = .*?)(\s{2,}#.*)?$", r"\1", tail_sections[1] + tail_sections[2])
    full = load_settings(write(tmp_path, head + tail))
    assert full.method.epochs == 200 and full.sender.calling_ae == "DIPNODE"  # really uncommented
    assert full.dip_params() == as_is.dip_params()
    assert full.calling_ae == as_is.calling_ae
    assert full.model_dump(exclude={"method", "sender"}) == as_is.model_dump(exclude={"method", "sender"})
    assert full.sender.model_dump(exclude={"calling_ae"}) == as_is.sender.model_dump(exclude={"calling_ae"})


def test_epochs_in_toml_follow_the_same_rule_as_the_command_line(tmp_path):
    # Before: `[method] epochs = 50` with the paper preset failed (m = 100 > 50 epochs) while
    # `--epochs 50` worked (the CLI moved m to 25). One rule now (models.params.resolve_params).
    from dipnode.node.cli.options import cli_params

    s = load_settings(write(tmp_path, MINIMAL + '[method]\npreset = "paper"\nepochs = 50\n'))
    assert (s.dip_params().epochs, s.dip_params().sample_from) == (50, 25)
    assert s.dip_params() == cli_params("paper", {"epochs": 50}).replace(device="auto")
    kept = load_settings(write(tmp_path, MINIMAL + '[method]\nepochs = 50\nsample_from = 40\n'))
    assert kept.dip_params().sample_from == 40  # an explicit m is kept
