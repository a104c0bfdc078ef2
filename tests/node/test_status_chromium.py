"""The status page in a real headless Chromium (Debian's ``chromium``, installed by .ci/run):
the page loads with jobs in several states, its thumbnails are fetched, and a screenshot is
saved (docs/status-page.png in the README is one of these)."""
from __future__ import annotations

import logging
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from statusnode import StatusNode

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(900)]

WIDTH, HEIGHT = 1500, 1200


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed (apt-get install chromium; .ci/run installs it)"
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", *args],
                          capture_output=True, text=True, timeout=120)


class Rows(HTMLParser):
    """Each job row of the dumped DOM: its id, the state shown, its thumbnail's source."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict] = {}
        self._row: dict | None = None
        self._depth = 0  # rows of tables nested in a job's row (its trust numbers)
        self.meta_refresh: str | None = None
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and self._row is not None:
            self._depth += 1
        elif tag == "tr" and (a.get("id") or "").startswith("job-"):
            self._row = self.rows.setdefault(int(a["id"][4:]), {"states": [], "img": None})
        elif tag == "span" and self._row is not None and "state" in (a.get("class") or "").split():
            self._row["states"].append((a.get("class") or "").split()[-1])
        elif tag == "img" and self._row is not None:
            self._row["img"] = a.get("src")
        elif tag == "meta" and a.get("http-equiv") == "refresh":
            self.meta_refresh = a.get("content")
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._depth:
            self._depth -= 1
        elif tag == "tr":
            self._row = None


def test_status_page_in_headless_chromium(status_node: StatusNode, tmp_path: Path, caplog) -> None:
    sn = status_node
    url = sn.url + "/"
    shot = tmp_path / "status-page.png"
    with caplog.at_level(logging.DEBUG, logger="dipnode.node.ops.http"):
        result = chromium(tmp_path / "profile", f"--screenshot={shot}", url)
        assert result.returncode == 0, result.stderr[-2000:]
        dom = chromium(tmp_path / "profile2", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rows = Rows()
    rows.feed(dom.stdout)
    assert rows.meta_refresh == "30" and rows.scripts == 0
    assert rows.rows[sn.done_job]["states"] == ["done"]
    assert rows.rows[sn.failed_job]["states"] == ["failed"]
    assert rows.rows[sn.dead_job]["states"] == ["failed"]
    assert rows.rows[sn.waiting_job]["states"] == ["waiting_for_mr"]
    assert rows.rows[sn.running_job]["states"] == ["running"]
    assert rows.rows[sn.done_job]["img"] == f"jobs/{sn.done_job}/thumbnail.png"
    # Chromium fetched the thumbnail from the node (the HTTP port's own log of the request).
    fetched = [r.getMessage() for r in caplog.records if f"GET /jobs/{sn.done_job}/thumbnail.png" in r.getMessage()]
    assert fetched and '" 200 ' in fetched[0]
    img = imread(shot)
    assert img.shape[:2] == (HEIGHT, WIDTH)
    assert float(np.std(img[..., :3])) > 0.05  # a page, not a blank screen
    # Keep the last screenshot next to the test's tmp folder for the README (docs/status-page.png).
    shutil.copy(shot, tmp_path.parent / "status-page.png")
