"""The dashboard's access rules: a token beyond loopback, host folders only under --data-root.

The rules are tested as functions, the launch with a stand-in for Streamlit's process, and the
real page in Chromium (served on 127.0.0.1 with a token set, which the page then requires).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest

from edge_runtime.app.cli import ExitStatus, main
from edge_runtime.app.dashboard import launch
from edge_runtime.app.dashboard.access import (
    TOKEN_ENV,
    folder_allowed,
    is_loopback,
    resolve_access,
    token_matches,
)
from tests.test_dashboard import CHROMIUM_FLAGS, _chromium, needs_streamlit, serve
from training.synthetic import synthetic_scan

TOKEN = "correct-horse-battery-staple-42"


def test_loopback_is_open_and_anything_else_gets_a_generated_token():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
        rules = resolve_access(host, environ={})
        assert rules.token is None and rules.any_folder and not rules.data_roots
    for host in ("0.0.0.0", "10.0.0.5", "::"):
        rules = resolve_access(host, environ={})
        assert rules.generated and len(rules.token) >= 16
        assert not rules.any_folder  # no folder on the host without --data-root
    other = resolve_access("0.0.0.0", environ={})
    assert other.token != resolve_access("0.0.0.0", environ={}).token


def test_a_token_comes_from_a_file_or_the_environment_and_must_be_long(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert resolve_access("0.0.0.0", token_file=path, environ={}).token == TOKEN
    assert resolve_access("0.0.0.0", environ={TOKEN_ENV: TOKEN}).token == TOKEN
    assert not resolve_access("0.0.0.0", environ={TOKEN_ENV: TOKEN}).generated
    with pytest.raises(ValueError, match="at least 16 characters"):
        resolve_access("0.0.0.0", environ={TOKEN_ENV: "short"})
    with pytest.raises(OSError, match="cannot read the token"):
        resolve_access("0.0.0.0", token_file=tmp_path / "missing", environ={})
    assert token_matches(TOKEN, TOKEN) and token_matches(TOKEN, f" {TOKEN} ")
    assert not token_matches(TOKEN, "wrong") and not token_matches(TOKEN, None)
    assert not token_matches(TOKEN, "") and token_matches(None, None)


def test_host_folders_are_limited_to_the_data_roots_links_resolved(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "day1").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    roots = (root.resolve(),)
    assert folder_allowed(str(root / "day1"), roots, any_folder=False)[0] == (root / "day1")
    for bad in (str(outside), str(root / "escape"), str(root / ".." / "outside"), "/etc"):
        allowed, reason = folder_allowed(bad, roots, any_folder=False)
        assert allowed is None and "not under a data root" in reason, bad
    allowed, reason = folder_allowed(str(root / "*"), roots, any_folder=False)
    assert allowed is None and "wildcards" in reason
    allowed, reason = folder_allowed("/etc", (), any_folder=False)
    assert allowed is None and "--data-root" in reason
    with pytest.raises(ValueError, match="--data-root must be an existing folder"):
        resolve_access("127.0.0.1", data_roots=[tmp_path / "nope"], environ={})


class _FakeProcess:
    def __init__(self, command, env):
        self.command, self.env = command, env

    def wait(self, timeout=None):
        return 0


def test_served_beyond_loopback_the_token_is_printed_once_and_passed_only_in_the_environment(
    monkeypatch, tmp_path
):
    started = []
    monkeypatch.setattr(
        launch.subprocess,
        "Popen",
        lambda command, env: started.append(_FakeProcess(command, env)) or started[-1],
    )
    monkeypatch.setattr(launch, "streamlit_available", lambda: True, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    stderr = io.StringIO()
    rules = resolve_access("0.0.0.0", data_roots=[tmp_path], environ={})
    assert (
        launch.run_dashboard(host="0.0.0.0", port=8501, model=None, stderr=stderr, access=rules)
        == 0
    )
    (process,) = started
    assert process.env[TOKEN_ENV] == rules.token
    assert rules.token not in " ".join(process.command)
    assert stderr.getvalue().count(rules.token) == 1
    assert ["--data-root", str(tmp_path.resolve())] == process.command[-2:]
    assert "--any-folder" not in process.command


def test_a_short_token_file_is_a_usage_error(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    path = tmp_path / "token"
    path.write_text("short")
    err = io.StringIO()
    status = main(["dashboard", "--token-file", str(path)], stdout=io.StringIO(), stderr=err)
    assert status == ExitStatus.USAGE and "at least 16 characters" in err.getvalue()


@needs_streamlit
def test_in_chromium_a_wrong_token_gets_nothing_and_folders_stay_under_the_data_root(
    tmp_path, monkeypatch
):
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    root, outside = tmp_path / "data", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    scan = synthetic_scan("benign", np.random.default_rng(3), (200, 260))
    cv2.imwrite(str(root / "inside.png"), scan)
    cv2.imwrite(str(outside / "secret.png"), scan)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with (
        serve(tmp_path, "--data-root", str(root)) as served,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(served.url)
        box = page.get_by_label("Access token (printed where the dashboard was started)")
        expect(box).to_be_visible(timeout=60_000)
        box.fill("not-the-token-at-all")
        page.get_by_role("button", name="Open the dashboard").click()
        expect(page.get_by_text("Wrong token.")).to_be_visible(timeout=30_000)
        # nothing but the banner and the token box: no upload, no folder box, no model
        assert page.locator("[data-testid=stFileUploaderDropzoneInput]").count() == 0
        assert page.get_by_role("tab").count() == 0
        content = page.content()
        for leaked in ("Classify folder", "default-int8", "default-fp32", "Model card", "inside"):
            assert leaked not in content, leaked

        page.reload()  # a fresh session is locked again; the right token opens it
        box = page.get_by_label("Access token (printed where the dashboard was started)")
        expect(box).to_be_visible(timeout=60_000)
        box.fill(TOKEN)
        page.get_by_role("button", name="Open the dashboard").click()
        uploader = page.locator("[data-testid=stFileUploaderDropzoneInput]")
        uploader.wait_for(state="attached", timeout=60_000)

        page.get_by_text("Or classify a folder on this host", exact=True).click()
        folder = page.get_by_placeholder("/data/today")
        folder.fill(str(outside))
        page.get_by_role("button", name="Classify folder").click()
        expect(page.get_by_text("not under a data root")).to_be_visible(timeout=30_000)
        folder.fill(str(root))
        page.get_by_role("button", name="Classify folder").click()
        page.get_by_role("tab", name="Batch").click()
        rows = page.locator("[data-testid=stDataFrame] tbody tr[role=row]")
        expect(rows).to_have_count(1, timeout=60_000)
        assert "inside.png" in rows.first.inner_text() or "inside" in page.content()
        assert "secret.png" not in page.content()
        browser.close()
