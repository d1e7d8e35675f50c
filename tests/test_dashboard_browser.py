"""The dashboard in a real browser: headless Debian Chromium driven by Playwright.

Each test leaves a screenshot in ``$MONQ_ARTIFACTS`` (default: ``test-artifacts/``
in the repository) for a person to look at.  The page runs under its real
Content-Security-Policy, so every wait here is a locator (Playwright's
``wait_for_function`` would need ``eval``, which the page forbids).

Resource handling: the module's browser, its Playwright driver, the
dashboard servers and the post-mortem cluster are all stopped in ``finally``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the dashboard extra (starlette) is not installed")
pytest.importorskip("httpx", reason="the dashboard tests need httpx")

from conftest import REPO, wait_until  # noqa: E402
from test_dashboard_live import _recorded, _run_tasks, dashboard_process  # noqa: E402

import monq  # noqa: E402
from monq.cluster import Cluster, ClusterConfig  # noqa: E402
from monq.connection import load_connection_file  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling home, and this
# closed network refuses it; a fresh profile per launch comes from Playwright.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WAIT_MS = 15_000
LABEL = f"dash-browser-{os.getpid()}"
N_OK, N_FAILED = 8, 3


def _artifacts() -> Path:
    d = Path(os.environ.get("MONQ_ARTIFACTS") or REPO / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} "
                    "(.ci/run installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright package is not installed")
    pw = sync_api.sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


class Page:
    """A browser tab that records what would betray a broken page: errors, dialogs, far requests."""

    def __init__(self, browser: Any, base: str) -> None:
        self.context = browser.new_context(viewport={"width": 1440, "height": 1000})
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.far: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def on_dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        self.page.on("dialog", on_dialog)
        self.page.on("request", lambda r: r.url.startswith(base) or self.far.append(r.url))

    def check_clean(self) -> None:
        assert self.dialogs == [], "text from the database ran as script"
        assert self.far == [], "the page asked for something outside the dashboard"
        assert self.errors == [], "the page logged errors"

    def shot(self, name: str, full_page: bool = False) -> Path:
        path = _artifacts() / name
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def live_tasks(cluster: Cluster) -> list[str]:
    """Good and failing tasks with this module's label on the session cluster."""
    info = load_connection_file(cluster.connection_file)
    with monq.Client(connection_file=cluster.connection_file, timeout=10.0) as c:
        failed = _run_tasks(c, LABEL, ok=N_OK, failing=N_FAILED)
    wait_until(lambda: _recorded(info.db_url, LABEL, N_OK + N_FAILED), 10,
               "the Hub to record the tasks")
    return failed


@pytest.fixture(scope="module")
def live_url(cluster: Cluster, live_tasks: list[str]) -> Iterator[str]:
    assert cluster.config.home is not None
    with dashboard_process(home=cluster.config.home) as (_, url):
        yield url


@pytest.fixture
def tab(browser: Any, live_url: str) -> Iterator[Page]:
    p = Page(browser, live_url.split("/?")[0])
    try:
        yield p
    finally:
        p.close()


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def test_live_page_shows_the_engines(tab: Page, live_url: str, client: monq.Client) -> None:
    expect = _expect()
    page = tab.page
    ids = client.ids

    def nap(seconds: float) -> float:  # nested: engines get it by value, not by module name
        import time

        time.sleep(seconds)
        return seconds

    # one task per engine that runs while we look: the page must show them busy
    busy = client.load_balanced_view(label=f"{LABEL}-busy")
    ars = [busy.apply_async(nap, 6.0) for _ in ids]
    try:
        page.goto(live_url)
        assert "token=" not in page.url  # traded for a cookie at once
        expect(page.locator("#mode")).to_have_text("live")
        for eid in ids:
            row = page.locator(f"#engines tbody tr[data-engine='{eid}']")
            expect(row).to_be_visible()
            expect(row.locator(".badge")).to_have_text(re.compile(r"^(idle|busy)$"))
        expect(page.locator("#engines tbody .badge", has_text="busy").first).to_be_visible()
        expect(page.locator("#n-running")).not_to_have_text("0")
        expect(page.locator("#n-engines")).to_have_text(str(len(ids)))
        expect(page.locator("#tasks tbody tr").first).to_be_visible()
        expect(page.locator("#chart svg rect.ok").first).to_be_attached()  # bars, not "none"
        tab.shot("dashboard-live-engines.png")
    finally:
        for ar in ars:
            ar.get(30)
    # the page follows the cluster: the engines go back to idle by themselves, once the
    # Hub has read the replies' copies (it may lag on a loaded machine) and the page has
    # polled again (every 2.5 s)
    expect(page.locator("#engines tbody .badge", has_text="busy")).to_have_count(0,
                                                                                 timeout=15_000)
    tab.check_clean()


def _filter_failed(page: Any) -> None:
    expect = _expect()
    page.fill("#filters input[name=label]", LABEL)
    page.select_option("#filters select[name=status]", "error")  # applies on change
    rows = page.locator("#tasks tbody tr")
    expect(rows).to_have_count(N_FAILED)
    expect(page.locator("#tasks-count")).to_have_text(f"{N_FAILED} matching")


def test_filter_to_failed_tasks(tab: Page, live_url: str) -> None:
    expect = _expect()
    page = tab.page
    page.goto(live_url)
    expect(page.locator("#tasks tbody tr").first).to_be_visible()
    _filter_failed(page)
    badges = page.locator("#tasks tbody tr .badge")
    assert badges.all_inner_texts() == ["error"] * N_FAILED
    errors = page.locator("#tasks tbody td.err").all_inner_texts()
    assert all(e.startswith("ValueError: bad input") for e in errors)
    assert "status=error" in page.url and "label=" in page.url  # a link that can be shared
    tab.shot("dashboard-failed-filter.png")
    tab.check_clean()


def test_open_a_failed_task_and_read_its_traceback(tab: Page, live_url: str,
                                                   live_tasks: list[str]) -> None:
    expect = _expect()
    page = tab.page
    page.goto(live_url)
    _filter_failed(page)
    row = page.locator("#tasks tbody tr").first
    msg_id = row.get_attribute("data-msg-id")
    assert msg_id in live_tasks
    row.click()
    view = page.locator("#task-view")
    expect(view).to_be_visible()
    expect(page.locator("#tv-msgid")).to_have_text(msg_id)
    expect(page.locator("#tv-status")).to_have_text("error")
    tb = page.locator("#tv-traceback")
    expect(tb).to_contain_text("Traceback (most recent call last)")
    expect(tb).to_contain_text("ValueError: bad input")
    expect(page.locator("#tv-error")).to_contain_text("ValueError: bad input")
    # the task printed a <script> tag: it shows as text and never runs
    stdout = page.locator("#tv-stdout")
    expect(stdout).to_contain_text("<script>alert('x")
    assert page.locator("#tv-stdout script, #tv-stdout *").count() == 0
    expect(page.locator("#tv-times")).to_contain_text("ran")
    tab.shot("dashboard-task-traceback.png")
    # Escape closes the view; the URL forgets the task
    page.keyboard.press("Escape")
    expect(view).to_be_hidden()
    assert "task=" not in page.url
    tab.check_clean()


def test_post_mortem_on_a_database_file(browser: Any, tmp_path: Path) -> None:
    """Record a history with a cluster of our own and watch it stop; then open the file alone."""
    expect = _expect()
    home = tmp_path / "pm-home"
    label = "post-mortem-run"
    cluster = Cluster(ClusterConfig(n=1, home=home, profile="pm"))
    try:
        info = cluster.start(timeout=60)
        with monq.Client(connection_file=cluster.connection_file, timeout=10.0) as c:
            _run_tasks(c, label, ok=5, failing=2)
        db_url = info.db_url
        wait_until(lambda: _recorded(db_url, label, 7), 10, "the Hub to record the tasks")
        # a live dashboard outlives its cluster: it says so and keeps showing the history
        with dashboard_process("--profile", "pm", home=home) as (_, url):
            tab = Page(browser, url.split("/?")[0])
            try:
                page = tab.page
                page.goto(url)
                expect(page.locator("#mode")).to_have_text("live")
                expect(page.locator("#engines tbody tr .badge")).to_have_text("idle")
                cluster.stop()
                expect(page.locator("#mode")).to_have_text("no cluster answering",
                                                           timeout=30_000)
                expect(page.locator("#banner")).to_contain_text("The cluster is not answering")
                expect(page.locator("#engines tbody tr .badge")).to_have_text("stopped")
                expect(page.locator("#tasks tbody tr")).to_have_count(7)
                tab.shot("dashboard-cluster-gone.png")
                tab.check_clean()
            finally:
                tab.close()
    finally:
        cluster.stop()
    assert not cluster.connection_file.exists()  # no cluster, no key: just the file
    started = time.monotonic()
    with dashboard_process("--db", db_url, home=home) as (_, url):
        tab = Page(browser, url.split("/?")[0])
        try:
            page = tab.page
            page.goto(url)
            expect(page.locator("#mode")).to_have_text("post-mortem")
            expect(page.locator("#engines tbody tr")).to_have_count(1)
            expect(page.locator("#engines tbody tr .badge")).to_have_text("stopped")
            rows = page.locator("#tasks tbody tr")
            expect(rows).to_have_count(7)
            assert set(page.locator("#tasks tbody td.lbl").all_inner_texts()) == {label}
            expect(page.locator("#n-failed")).to_have_text("2")
            expect(page.locator("#chart svg rect.bad").first).to_be_attached()
            tab.shot("dashboard-postmortem.png")
            tab.check_clean()
        finally:
            tab.close()
    assert time.monotonic() - started < 60
