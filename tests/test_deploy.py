"""deploy/: the compose file validates, the settings files load, Orthanc routes to the node,
and the container's health check passes against a node started as the container starts it."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dipnode.models.params import PRESETS, Method
from dipnode.node.jobs.pipeline import series_descriptions
from dipnode.node.settings import OutputSettings, load_settings
from peers import free_port

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


def test_route_loop_guard_matches_every_output_description() -> None:
    # The Lua route forwards every PET and MR series except those whose description matches
    # its guard; every series the node writes must match it, or Orthanc routes it back.
    lua = (DEPLOY / "orthanc-route.lua").read_text()
    guards = re.findall(r"string\.find\(description, '\^([A-Za-z0-9 _-]+)'\)", lua)
    assert len(guards) == 1, guards
    prefix = OutputSettings().description_prefix
    assert guards[0] == prefix
    for method in Method:
        for text in series_descriptions(prefix, method, PRESETS["paper"]).values():
            assert text.startswith(guards[0]), text
    assert not "PET Brain FDG".startswith(guards[0])  # a scanner's series is routed


def test_example_settings_need_the_callers_written() -> None:
    from dipnode.node.settings import SettingsError

    text = (DEPLOY / "dipnode.example.toml").read_text()
    assert not re.search(r'(?m)^allowed_calling_aets\s*=\s*\["\*"\]', text)  # no active "*"
    with pytest.raises(SettingsError, match="node.allowed_calling_aets"):
        load_settings(DEPLOY / "dipnode.example.toml")


def test_example_settings_load_once_the_callers_are_listed(monkeypatch) -> None:
    monkeypatch.setenv("DIPNODE_NODE__ALLOWED_CALLING_AETS", '["ORTHANC", "PETMR1"]')
    s = load_settings(DEPLOY / "dipnode.example.toml")
    assert s.dip_params().epochs == 200  # the paper preset by default
    assert s.node.host == "127.0.0.1"    # loopback unless the admin says otherwise


# -- the container, as Docker and compose run it ---------------------------------------------
def _dockerfile_instruction(name: str) -> str:
    """The text of the (last) instruction ``name``, line continuations joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    found = re.findall(rf"(?m)^{name}\s+(.*)$", text)
    assert found, f"no {name} in deploy/Dockerfile"
    return found[-1]


def _command(text: str) -> list[str]:
    """A Dockerfile CMD: exec form (JSON array) as is, shell form through /bin/sh -c."""
    text = text.strip()
    return json.loads(text) if text.startswith("[") else ["/bin/sh", "-c", text]


def container_env(tmp_path: Path, port: int, http_port: int | None = None) -> dict[str, str]:
    """The dipnode container's environment (Dockerfile ENV, then compose's), with its volume
    paths mapped to this checkout and only ports and paths overridden by DIPNODE_* variables."""
    service = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["dipnode"]
    mounts = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = str((DEPLOY / source).resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIPNODE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # dipnode
    for line in re.findall(r"(?m)^ENV\s+(.*)$", (DEPLOY / "Dockerfile").read_text()):
        for item in shlex.split(line):
            key, _, value = item.partition("=")
            env[key] = value
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    env["DIPNODE_CONFIG"] = mounts[env["DIPNODE_CONFIG"]]  # the mounted settings file
    env.update({
        "DIPNODE_NODE__HOST": "127.0.0.1",  # tests bind loopback only
        "DIPNODE_NODE__PORT": str(port),
        "DIPNODE_HTTP__PORT": str(http_port if http_port is not None else free_port()),
        "DIPNODE_STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
        "DIPNODE_STORAGE__DATABASE": str(tmp_path / "dipnode.sqlite"),
    })
    return env


def test_container_env_uses_the_compose_settings_file(tmp_path: Path) -> None:
    env = container_env(tmp_path, 11112)
    assert Path(env["DIPNODE_CONFIG"]) == (DEPLOY / "dipnode.compose.toml").resolve()
    assert _command(_dockerfile_instruction("CMD")) == ["dipnode", "serve"]
    assert "USER dipnode" in (DEPLOY / "Dockerfile").read_text()


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(180)
def test_container_health_check_passes_against_the_compose_settings(tmp_path: Path) -> None:
    import torch

    port, http_port = free_port(), free_port()
    env = container_env(tmp_path, port, http_port)
    health = _command(re.sub(r"^(--\S+\s+)*CMD\s+", "", _dockerfile_instruction("HEALTHCHECK")))
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(_command(_dockerfile_instruction("CMD")), env=env, cwd=tmp_path,
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            r = subprocess.run(health, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
            if r.returncode == 0 or time.monotonic() > deadline or serve.poll() is not None:
                break
            time.sleep(0.5)
        assert r.returncode == 0, r.stdout + r.stderr + log_path.read_text()
        # Called as the PACS the compose settings allow (the node's own title is not listed).
        # Then the node's /healthz on its HTTP port (database, spool, workers), as `dipnode
        # health` asks it in the container.
        assert r.stdout.strip().splitlines() == [f"C-ECHO DIPNODE@127.0.0.1:{port} as ORTHANC: success",
                                                 f"http://127.0.0.1:{http_port}/healthz: ok"]
        # What `docker compose exec dipnode dipnode jobs` runs in the container (README).
        jobs = subprocess.run(["dipnode", "jobs"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert jobs.returncode == 0 and "no unfinished jobs" in jobs.stdout, jobs.stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    text = log_path.read_text()
    # The compose settings run the paper preset with device auto: on a host without CUDA the
    # node says once, at start, that this takes days; with CUDA it says nothing of the kind.
    warnings = text.count('method preset "paper" on the CPU')
    assert warnings == (0 if torch.cuda.is_available() else 1), text
    # Down: the health check fails in one line, no pynetdicom log lines.
    r = subprocess.run(health, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("dipnode health: error: C-ECHO"), r.stderr


def test_every_package_is_installed_by_a_plain_pip_install() -> None:
    # The container runs `pip install .`, which installs the packages pyproject.toml lists and
    # nothing else: a sub-package missing there (node/jobs/ once was) breaks the image.
    import tomllib

    root = DEPLOY.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"dipnode." + ".".join(p.parent.relative_to(root).parts)
             for top in ("node", "dicom_io", "models", "sim") for p in (root / top).rglob("__init__.py")}
    assert found == listed


# -- the Ray cluster compose file ---------------------------------------------------------------
def test_ray_compose_validates_and_its_node_drives_its_head(monkeypatch: pytest.MonkeyPatch) -> None:
    r = subprocess.run(["docker-compose", "-f", str(DEPLOY / "compose.ray.yaml"), "config", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    services = yaml.safe_load((DEPLOY / "compose.ray.yaml").read_text())["services"]
    assert set(services) == {"orthanc", "ray-head", "ray-worker", "dipnode"}
    # One image with the ray extra for the node, the head and the workers (one Ray version).
    for name in ("ray-head", "ray-worker", "dipnode"):
        assert services[name]["build"]["args"] == {"DIPNODE_EXTRAS": "[ray]"}, name
    assert 'RUN pip install --no-cache-dir ".${DIPNODE_EXTRAS}"' in (DEPLOY / "Dockerfile").read_text()
    head_port = next(a.split("=")[1] for a in services["ray-head"]["command"] if a.startswith("--port="))
    # The node's settings, as the container reads them: the compose file's environment over the
    # mounted settings file.
    node = services["dipnode"]
    for key, value in node["environment"].items():
        if key.startswith("DIPNODE_WORKERS__"):
            monkeypatch.setenv(key, str(value))
    s = load_settings(DEPLOY / "dipnode.compose.toml")
    assert (s.workers.executor, s.workers.ray_address) == ("ray", f"ray-head:{head_port}")
    assert s.workers.gpu_resource == "GPU" and s.workers.gpus_per_job == 1.0
    # The GPU worker offers the GPU a job asks for, and one is reserved for it; the node's
    # container joins the cluster with nothing to offer (a Ray driver runs on a Ray node).
    worker = services["ray-worker"]
    assert "--num-gpus=1" in worker["command"] and f"--address=ray-head:{head_port}" in worker["command"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    join = node["command"][-1]
    assert f"ray start --address=ray-head:{head_port} --num-cpus=0 --num-gpus=0" in join
    assert join.rstrip().endswith("exec dipnode serve")
