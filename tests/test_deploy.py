"""deploy/: the compose file validates, the settings files load, Orthanc routes to the node."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from dipnode.node.settings import load_settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_compose_file_validates() -> None:
    # Debian's docker-compose validates without a Docker engine (.ci/run installs it).
    r = subprocess.run(["docker-compose", "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_settings_route_node_and_pacs_to_each_other() -> None:
    s = load_settings(DEPLOY / "dipnode.compose.toml")
    orthanc = json.loads((DEPLOY / "orthanc.json").read_text())
    aet, host, port = orthanc["DicomModalities"]["dipnode"]
    assert (aet, port) == (s.node.ae_title, s.node.port)
    assert [d.label for d in s.destinations] == [f"{orthanc['DicomAet']}@orthanc:{orthanc['DicomPort']}"]
    assert s.node.allowed_calling_aets == [orthanc["DicomAet"]]
    lua = (DEPLOY / "orthanc-route.lua").read_text()
    assert "SendToModality(seriesId, 'dipnode')" in lua
    assert "/etc/orthanc/route.lua" in orthanc["LuaScripts"]


def test_example_settings_load() -> None:
    s = load_settings(DEPLOY / "dipnode.example.toml")
    assert s.dip_params().epochs == 200  # the paper preset by default


def test_container_health_check_is_a_real_c_echo() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile and "echoscu" in dockerfile
    assert "USER dipnode" in dockerfile
