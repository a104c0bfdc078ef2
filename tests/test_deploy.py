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
    assert "/etc/orthanc/route.lua" in orthanc["LuaScripts"]
    # The node fetches prior MR from the same Orthanc: C-MOVE back to the modality Orthanc
    # knows as "dipnode" (its AE title is the node's), and Orthanc may call the node.
    [source] = s.sources
    assert (source.ae_title, source.host, source.port) == (orthanc["DicomAet"], "orthanc", orthanc["DicomPort"])
    assert source.retrieve == "move" and (source.move_destination or s.node.ae_title) == aet


def _code(lua: str) -> str:
    return "\n".join(line.split("--")[0] for line in lua.splitlines())


def test_routing_script_posts_series_to_the_rest_route_and_readme_shows_it_exactly() -> None:
    lua = (DEPLOY / "orthanc-route.lua").read_text()
    code = _code(lua)
    # SendToModality() sends one instance (it fails on a series ID): only the REST route is used.
    assert "SendToModality" not in code
    assert "RestApiPost('/modalities/dipnode/store'" in code and "Asynchronous = true" in code
    readme = (DEPLOY.parent / "README.md").read_text()
    block = readme.split("```lua\n", 1)[1].split("```", 1)[0]
    assert block.strip() and block.strip() in lua  # the README shows what the tests run
    compose = (DEPLOY / "compose.yaml").read_text()
    assert "./orthanc-route.lua:/etc/orthanc/route.lua:ro" in compose


def test_example_settings_load() -> None:
    s = load_settings(DEPLOY / "dipnode.example.toml")
    assert s.dip_params().epochs == 200  # the paper preset by default


def test_container_health_check_is_a_real_c_echo() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile and "echoscu" in dockerfile
    assert "USER dipnode" in dockerfile
