"""The node's HTTP port over real HTTP: Prometheus metrics (parsed by prometheus-client's own
parser), the status page, /healthz, tokens, and the administrator's re-run / re-send."""
from __future__ import annotations

import base64
import re
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dipnode.node.ops.http import HttpConfig, HttpServer, csrf_token
from dipnode.node.jobs.rows import JobState
from dipnode.node.server import Node
from dipnode.node.settings import Settings, SettingsError, load_settings
from peers import run_storescu, storescu_statuses
from statusnode import ADMIN_TOKEN, StatusNode

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]


def get(url: str, auth: str | None = None, data: bytes | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if auth:
        req.add_header("Authorization", auth)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def basic(password: str, user: str = "admin") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_scraped_over_http(status_node: StatusNode, tmp_path: Path) -> None:
    sn = status_node
    # One refusal: an instance the node holds, re-sent with other content (0x0111).
    ds = pydicom.dcmread(sn.study.pet_files[0])
    ds.InstanceNumber = 999
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    assert storescu_statuses(run_storescu([changed], sn.node.port)) == [0x0111]
    status, headers, body = get(sn.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    m = samples(body.decode())
    n = len(sn.study.pet_files) + len(sn.study.mr_files)
    assert m[("dipnode_instances_received_total", ())] == n
    assert m[("dipnode_instances_refused_total", (("status", "0x0111"),))] == 1
    assert m[("dipnode_series_completed_total", (("modality", "PT"),))] == 1
    assert m[("dipnode_series_completed_total", (("modality", "MR"),))] == 1
    assert m[("dipnode_jobs", (("state", "done"),))] >= 1
    assert m[("dipnode_jobs", (("state", "failed"),))] >= 2
    assert m[("dipnode_jobs", (("state", "waiting_for_mr"),))] == 1
    assert m[("dipnode_dead_letters", ())] >= 1
    assert m[("dipnode_fit_seconds_count", (("method", "sdip"),))] == 1
    assert m[("dipnode_fit_seconds_sum", (("method", "sdip"),))] > 0
    assert m[("dipnode_mr_wait_seconds_count", ())] == 1
    assert m[("dipnode_send_seconds_count", ())] == 1  # the done job's one delivery
    assert m[("dipnode_sender_retries_total", ())] == 0
    assert m[("dipnode_spool_free_bytes", ())] > 0
    assert ("dipnode_retention_sweeps_total", (("kind", "scheduled"),)) in m
    assert not any(k[0].startswith("dipnode_gpu") for k in m)  # on the CPU: no GPU gauge


def test_status_page_lists_failures_first_with_trust_numbers_and_thumbnails(status_node: StatusNode) -> None:
    sn = status_node
    status, headers, body = get(sn.url + "/")
    html = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<meta http-equiv="refresh" content="30">' in html
    assert "<script" not in html
    assert "Mattes MI -0.12 after registration" in html and "dead letter:" in html
    pos = {k: html.index(f"id=job-{getattr(sn, k)}>") for k in
           ("failed_job", "dead_job", "waiting_job", "running_job", "done_job")}
    assert max(pos["failed_job"], pos["dead_job"]) < min(pos["waiting_job"], pos["running_job"]) < pos["done_job"]
    done = sn.node.store.job(sn.done_job)
    t = done.report["trust"]
    assert 0 < t["measured_fraction"] < 1 and t["brain_voxels"] > 1000
    assert f"{100 * t['measured_fraction']:.0f} %" in html and f"{100 * t['hot_change']:+.1f} %" in html
    assert done.report["registration"]["method"] == "rigid"
    assert "re-run" not in html  # read-only without the admin token
    status, headers, png = get(sn.url + f"/jobs/{sn.done_job}/thumbnail.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert get(sn.url + f"/jobs/{sn.failed_job}/thumbnail.png")[0] == 404


def test_healthz(status_node: StatusNode, tmp_path: Path) -> None:
    assert get(status_node.url + "/healthz")[:1] == (200,)
    assert get(status_node.url + "/healthz")[2] == b"ok\n"
    # A node whose scheduler is not running (never started) says so, with 503.
    settings = Settings(node={"port": 0, "allowed_calling_aets": ["*"]},
                        storage={"spool_dir": tmp_path / "spool", "database": tmp_path / "db.sqlite",
                                 "min_free_mb": 0})
    node = Node(settings)
    server = HttpServer(HttpConfig(port=0), node.http.site)
    server.start()
    try:
        status, _, body = get(f"http://127.0.0.1:{server.port}/healthz")
        assert status == 503 and body == b"workers: the scheduler is not running\n"
    finally:
        server.stop()
        node.stop()


def test_token_required_when_set_bearer_or_basic(status_node: StatusNode) -> None:
    server = HttpServer(HttpConfig(port=0, token="reader-token-0123456789"), status_node.node.http.site)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        for path in ("/", "/metrics", f"/jobs/{status_node.done_job}/thumbnail.png"):
            status, headers, _ = get(url + path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
            assert get(url + path, "Bearer wrong-token-0123456789")[0] == 401
            assert get(url + path, "Bearer reader-token-0123456789")[0] == 200
            assert get(url + path, basic("reader-token-0123456789", user="anyone"))[0] == 200
        assert get(url + "/healthz")[0] == 200  # the health check needs no token
        assert get(url + "/admin", "Bearer reader-token-0123456789")[0] == 401  # no admin token set
    finally:
        server.stop()


def test_settings_refuse_an_open_port_without_token(tmp_path: Path) -> None:
    cfg = tmp_path / "n.toml"
    cfg.write_text('[node]\nallowed_calling_aets = ["*"]\n[http]\nhost = "0.0.0.0"\n')
    with pytest.raises(SettingsError, match=r"http.token: expected a token of 16 or more characters when host "
                                            r"is not loopback"):
        load_settings(cfg)
    cfg.write_text('[node]\nallowed_calling_aets = ["*"]\n[http]\nhost = "0.0.0.0"\n'
                   'token = "reader-token-0123456789"\nadmin_token = "reader-token-0123456789"\n')
    with pytest.raises(SettingsError, match="admin_token: expected a token other than token"):
        load_settings(cfg)


def test_admin_rerun_and_resend_need_the_admin_token_and_the_form(status_node: StatusNode) -> None:
    sn = status_node
    assert get(sn.url + "/admin")[0] == 401
    status, _, body = get(sn.url + "/admin", basic(ADMIN_TOKEN))
    html = body.decode()
    assert status == 200 and "administrator" in html
    forms = re.findall(r'<form method=post action="jobs/(\d+)/(rerun|resend)"><input type=hidden name=csrf '
                       r'value="([0-9a-f]{64})">', html)
    assert (str(sn.dead_job), "resend", csrf_token(ADMIN_TOKEN, sn.dead_job)) in forms
    assert (str(sn.done_job), "rerun", csrf_token(ADMIN_TOKEN, sn.done_job)) in forms
    rerun = f"{sn.url}/jobs/{sn.done_job}/rerun"
    good = f"csrf={csrf_token(ADMIN_TOKEN, sn.done_job)}".encode()
    assert get(rerun, None, good)[0] == 401  # the form alone is not enough
    assert get(rerun, basic(ADMIN_TOKEN), f"csrf={csrf_token(ADMIN_TOKEN, sn.dead_job)}".encode())[0] == 403
    before = {j.id for j in sn.node.store.jobs()}
    status, headers, body = get(rerun, basic(ADMIN_TOKEN), good)
    assert status == 303 and headers["Location"] == f"/admin#job-{sn.done_job}"
    new = [j for j in sn.node.store.jobs() if j.id not in before]
    assert len(new) == 1 and new[0].rerun_of == sn.done_job and body.decode().startswith(f"job {new[0].id} queued")
    status, _, body = get(f"{sn.url}/jobs/{sn.dead_job}/resend", basic(ADMIN_TOKEN),
                          f"csrf={csrf_token(ADMIN_TOKEN, sn.dead_job)}".encode())
    assert status == 303 and body == f"job {sn.dead_job}: 1 deliveries queued again\n".encode()
    # Nothing dead any more to re-send: a clear refusal, not a 500.
    status, _, body = get(f"{sn.url}/jobs/{sn.waiting_job}/resend", basic(ADMIN_TOKEN),
                          f"csrf={csrf_token(ADMIN_TOKEN, sn.waiting_job)}".encode())
    assert status == 409 and b"has no dead deliveries" in body
    assert sn.node.store.job(sn.waiting_job).state is JobState.WAITING_FOR_MR
