"""The dashboard in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by Selenium; nothing is downloaded), against the app served by uvicorn on a free
127.0.0.1 port over a SQLite file of the test's own.

It must show a pushed task, a live worker with its current task and a failed task's error;
Retry must requeue the failed task and Cancel cancel a pending one, both checked in the
backend, for odd ids too ("/..", "%", a trailing "/retry"). A page of another origin (another
port of 127.0.0.1: "same-site", not same-origin) must not be able to change a task through
the browser when no token is set. A screenshot is kept in ``tests/artifacts/dashboard.png``.
Without chromium the tests skip on a laptop and fail under CI=true, like the broker fixtures.
"""

from __future__ import annotations

import http.server
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from api_support import clear_conveyor_env, free_port, require_modules

require_modules("fastapi", "uvicorn", "selenium")

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from conftest import unavailable, wait_until  # noqa: E402
from conveyor import QueueManager  # noqa: E402
from conveyor.api import create_app  # noqa: E402
from conveyor.settings import Settings  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts"
TOKEN = "dashboard-test-token"
CHROME_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--no-first-run",
    "--window-size=1440,1000",
]  # fmt: skip
Serve = Callable[..., str]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """One headless Chromium for the module; its console is captured for errors."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        unavailable("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    assert chromium is not None and driver_path is not None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except WebDriverException as exc:
        unavailable(f"chromium did not start: {exc.msg}")
    yield driver
    driver.quit()


@pytest.fixture
def db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A SQLite file in the test's own directory, named as a user would (the header shows it)."""
    clear_conveyor_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    return "sqlite:///conveyor.db"


class Recorder:
    """ASGI middleware keeping (method, path, status) of every answer: proof that requests
    a test expects to be refused did reach the server and were refused there."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str, int]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def record(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.seen.append((scope["method"], scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, record if scope["type"] == "http" else send)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder(None)


@pytest.fixture
def serve(db_url: str, recorder: Recorder, browser: webdriver.Chrome) -> Iterator[Serve]:
    """``serve(**settings) -> base URL``: the app under uvicorn in a thread, stopped after
    the browser left the page (its live event stream would hold the server open, and its
    reconnects would log errors into the next test's console)."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: Any) -> str:
        settings = Settings(url=db_url, queue={"name": "meetings"}, **overrides)
        port = free_port()
        recorder.app = create_app(settings)
        config = uvicorn.Config(recorder, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_until(lambda: server.started, timeout=15, message="uvicorn to start")
        return f"http://127.0.0.1:{port}"

    yield start
    browser.get("about:blank")
    browser.get_log("browser")
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def queues(db_url: str) -> Iterator[dict[str, QueueManager]]:
    made = {name: QueueManager.from_url(db_url, queue_name=name) for name in ("meetings", "emails")}
    yield made
    for manager in made.values():
        manager.close()


def populate(queues: dict[str, QueueManager]) -> None:
    """A small, realistic backend: done, failed, running, pending and scheduled tasks on two
    queues, and two live workers, one of them running a task."""
    meetings, emails = queues["meetings"], queues["emails"]
    assert meetings.push("all-hands-0408", {"audio_files": ["all-hands.wav"]}, 10, type="meeting")
    failing = meetings.reserve(timeout=1)
    assert failing is not None
    error = {"type": "DecodeError", "message": "all-hands.wav: not a RIFF file (bad header)"}
    assert meetings.fail(failing, reason="error", error=error)
    for n in range(4):
        assert meetings.push(f"retro-03{20 + n}", {"audio_files": [f"r{n}.wav"]}, 8,
                             type="meeting")  # fmt: skip
        done = meetings.reserve(timeout=1)
        assert done is not None
        time.sleep(0.03)  # a run time to show as the mean
        assert meetings.ack(done, {"summary": "ok"})
    assert meetings.push("board-review-0411", {"audio_files": ["board.wav"]}, 9, type="meeting")
    running = meetings.reserve(timeout=1)
    assert running is not None
    assert meetings.push("weekly-sync-0412", {"audio_files": ["weekly.wav"]}, 5, type="meeting")
    assert meetings.push("standup-0415", {"audio_files": ["standup.wav"]}, 3, type="meeting")
    assert meetings.push("quarterly-0501", {}, 5, type="meeting", delay=3600)
    for n in range(3):
        assert emails.push(f"digest-{n}", {"to": f"team{n}@example.com"}, 2, type="email")
    now = time.time()
    beat = {"host": "worker-host-1", "concurrency": 2, "processed": 4, "failed": 1,
            "started_at": now - 300, "last_seen": now, "state": "running"}  # fmt: skip
    current = [{"task_id": "board-review-0411", "queue": "meetings", "type": "meeting",
                "step": "transcribe"}]  # fmt: skip
    meetings.register_worker("worker-7f3a", {**beat, "id": "worker-7f3a", "pid": 4121,
                             "queues": ["meetings"], "current": current}, ttl=120)  # fmt: skip
    emails.register_worker("worker-91c2", {**beat, "id": "worker-91c2", "pid": 4188,
                           "queues": ["emails", "meetings"], "current": [], "processed": 0,
                           "failed": 0}, ttl=120)  # fmt: skip


def text_of(browser: webdriver.Chrome, selector: str) -> str:
    return str(browser.find_element(By.CSS_SELECTOR, selector).text)


def shows(browser: webdriver.Chrome, selector: str, *needles: str) -> Callable[[], bool]:
    """A predicate for wait_until; an element replaced by a redraw is looked up again."""

    def check() -> bool:
        try:
            return all(needle in text_of(browser, selector) for needle in needles)
        except (NoSuchElementException, StaleElementReferenceException):
            return False

    return check


def screenshot(browser: webdriver.Chrome, path: Path) -> None:
    """The whole page, however tall: the viewport is stretched to the content for the shot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]
    metrics = {"width": 1440, "height": int(height), "deviceScaleFactor": 1, "mobile": False}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        assert browser.save_screenshot(str(path))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def click(browser: webdriver.Chrome, selector: str, timeout: float = 10) -> None:
    """Click the element once it is there; the page redraws every 2 s, so an element found
    a moment ago may have been replaced: find it again."""

    def attempt() -> bool:
        try:
            browser.find_element(By.CSS_SELECTOR, selector).click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True

    wait_until(attempt, timeout, message=f"a click on {selector}")


def console_errors(browser: webdriver.Chrome) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE"]  # fmt: skip


def test_dashboard_shows_tasks_workers_and_errors_and_retry_requeues(
    browser: webdriver.Chrome, serve: Serve, queues: dict[str, QueueManager]
) -> None:
    populate(queues)
    browser.get(serve())
    wait_until(shows(browser, "#recent", "weekly-sync-0412", "pending"), 15, message="task")
    wait_until(shows(browser, "#workers", "worker-7f3a", "board-review-0411", "transcribe"), 5)
    wait_until(shows(browser, "#failed", "all-hands-0408", "not a RIFF file (bad header)"), 5)
    wait_until(shows(browser, "#queues", "meetings", "emails"), 5)
    assert text_of(browser, "#c-pending") == "5"  # 2 meetings + 3 emails
    assert text_of(browser, "#c-done") == "4"

    screenshot(browser, ARTIFACTS / "dashboard.png")

    retry = '#failed button.retry[data-task-id="all-hands-0408"]'
    browser.find_element(By.CSS_SELECTOR, retry).click()
    meetings = queues["meetings"]
    wait_until(lambda: meetings.require_task("all-hands-0408").status == "pending", 10,
               message="the retried task to be pending in the backend")  # fmt: skip
    wait_until(shows(browser, "#failed", "no failed tasks"), 10, message="the failed list")

    cancel = '#recent button.cancel[data-task-id="standup-0415"]'
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, cancel), 5)
    browser.find_element(By.CSS_SELECTOR, cancel).click()
    wait_until(lambda: meetings.require_task("standup-0415").status == "canceled", 10,
               message="the canceled task in the backend")  # fmt: skip
    assert console_errors(browser) == []


def test_with_a_token_the_dashboard_asks_for_it(
    browser: webdriver.Chrome, serve: Serve, queues: dict[str, QueueManager]
) -> None:
    # Markup in an id is shown as text, never interpreted (every value is set as text).
    assert queues["meetings"].push("secret-<b>plan</b>", {}, 5)
    browser.get(serve(api={"token": TOKEN}))
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_until(lambda: browser.find_element(By.ID, "login").is_displayed(), 10, message="login")
    assert "secret" not in text_of(browser, "#recent")

    field = browser.find_element(By.ID, "token")
    field.send_keys("wrong-token\n")
    wait_until(shows(browser, "#login-error", "refused"), 10, message="the refusal")
    field.clear()
    field.send_keys(TOKEN + "\n")
    wait_until(shows(browser, "#recent", "secret-<b>plan</b>"), 10, message="data after login")
    assert not browser.find_elements(By.CSS_SELECTOR, "#recent b")
    assert not browser.find_element(By.ID, "login").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('conveyor.token')") == TOKEN
    # Only the 401s of the refused attempts may be in the console.
    errors = console_errors(browser)
    assert all("401" in message for message in errors), errors


def test_cancel_and_retry_work_for_odd_ids(
    browser: webdriver.Chrome, serve: Serve, queues: dict[str, QueueManager]
) -> None:
    """The dashboard encodes the whole id as one path segment ("/" too), so neither the
    browser's normalisation of "/.." nor a trailing "/retry" sends the click elsewhere."""
    meetings = queues["meetings"]
    odd = ["a/../b", "x/retry", "50%?#", "../up"]
    for task_id in [*odd, "b", "x", "up"]:
        assert meetings.push(task_id, {"id": task_id}, 5)
    browser.get(serve())
    for task_id in odd:
        click(browser, f'#recent button.cancel[data-task-id="{task_id}"]')
        wait_until(lambda t=task_id: meetings.require_task(t).status == "canceled", 10,
                   message=f"{task_id!r} canceled in the backend")  # fmt: skip
        click(browser, f'#recent button.retry[data-task-id="{task_id}"]')
        wait_until(lambda t=task_id: meetings.require_task(t).status == "pending", 10,
                   message=f"{task_id!r} pending again")  # fmt: skip
    assert {meetings.require_task(t).status for t in ("b", "x", "up")} == {"pending"}
    assert console_errors(browser) == []


ATTACK = """<!doctype html><html><body>
<iframe name="sink1"></iframe><iframe name="sink2"></iframe>
<form id="retry" target="sink1" method="POST"
      action="{api}/api/v1/tasks/failed-1/retry?queue=meetings"></form>
<form id="push" target="sink2" method="POST" enctype="text/plain" action="{api}/api/v1/tasks">
  <input name='{{"id": "planted", "data": 1, "x": "' value='"}}'></form>
<iframe sandbox="allow-forms allow-scripts" srcdoc='<form method="POST" target="_self"
  action="{api}/api/v1/tasks/failed-3/retry?queue=meetings"></form>
  <script>document.forms[0].submit()</script>'></iframe>
<script>
(async () => {{
  const tasks = "{api}/api/v1/tasks";
  const pending = `${{tasks}}/pending-1?queue=meetings`;
  const planted = JSON.stringify({{id: "planted2", data: 1}});
  await Promise.allSettled([
    fetch(`${{tasks}}/failed-2/retry?queue=meetings`, {{method: "POST", mode: "no-cors"}}),
    fetch(pending, {{method: "DELETE", mode: "no-cors"}}),
    fetch(pending, {{method: "DELETE"}}),
    fetch(tasks, {{method: "POST", mode: "no-cors", body: planted,
                  headers: {{"Content-Type": "text/plain"}}}}),
  ]);
  document.forms.retry.submit();
  document.forms.push.submit();
  document.title = "sent";
}})();
</script></body></html>"""


@pytest.fixture
def attacker(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``attacker(api_url) -> page URL``: a page on another origin (another port of
    127.0.0.1) that tries to retry, cancel and push tasks on the API through the browser."""
    folder = tmp_path / "attacker"
    folder.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def page(api: str) -> str:
        (folder / "index.html").write_text(ATTACK.format(api=api))
        return f"http://127.0.0.1:{server.server_address[1]}/index.html"

    yield page
    server.shutdown()
    server.server_close()


def test_a_page_of_another_origin_cannot_change_tasks_without_a_token(
    browser: webdriver.Chrome,
    serve: Serve,
    queues: dict[str, QueueManager],
    attacker: Callable[[str], str],
    recorder: Recorder,
) -> None:
    meetings = queues["meetings"]
    for n in (1, 2, 3):
        assert meetings.push(f"failed-{n}", {}, 10)
        leased = meetings.reserve(timeout=1)
        assert leased is not None and meetings.fail(leased, reason="error", error="boom")
    assert meetings.push("pending-1", {}, 5)

    api = serve()
    browser.get(attacker(api))
    wait_until(lambda: browser.title == "sent", 15, message="the attack page to send")

    def refused() -> list[tuple[str, str, int]]:
        return [hit for hit in recorder.seen if hit[2] == 403]

    # Each form post and no-cors fetch reached the server and was refused there (the sandboxed
    # frame's "Origin: null" included); the DELETEs never left the browser (no-cors allows
    # no DELETE, and the CORS preflight gets no grant).
    wait_until(lambda: len(refused()) >= 5, 15, message=lambda: f"5 refusals in {recorder.seen}")
    assert {path for _, path, _ in refused()} >= {
        "/api/v1/tasks/failed-1/retry", "/api/v1/tasks/failed-2/retry",
        "/api/v1/tasks/failed-3/retry", "/api/v1/tasks",
    }  # fmt: skip
    assert not [hit for hit in recorder.seen if hit[0] != "OPTIONS" and hit[2] < 400]
    for n in (1, 2, 3):
        assert meetings.require_task(f"failed-{n}").status == "failed"
    assert meetings.require_task("pending-1").status == "pending"
    assert meetings.get_task("planted") is None and meetings.get_task("planted2") is None

    # The same browser on the dashboard itself (its own origin) may.
    browser.get(api)
    click(browser, '#failed button.retry[data-task-id="failed-1"]')
    wait_until(lambda: meetings.require_task("failed-1").status == "pending", 10,
               message="the dashboard's own retry")  # fmt: skip


def stats_requests(recorder: Recorder) -> int:
    return sum(1 for _, path, _ in recorder.seen if path == "/api/v1/stats")


def test_the_dashboard_follows_events_live_and_the_task_page_shows_a_task(
    browser: webdriver.Chrome, serve: Serve, queues: dict[str, QueueManager], recorder: Recorder
) -> None:
    meetings = queues["meetings"]
    assert meetings.push("live-0501", {"audio_files": ["live.wav"]}, 7, type="meeting")
    browser.get(serve(api={"token": TOKEN}))
    browser.execute_script(f"sessionStorage.setItem('conveyor.token', '{TOKEN}')")
    browser.refresh()
    wait_until(shows(browser, "#recent", "live-0501", "pending"), 15, message="the task")
    browser.get_log("browser")  # the 401s of the first load, before the token was stored
    browser.execute_script("window.sameDocument = true")  # gone if the page reloads
    message = meetings.reserve(timeout=1)
    assert message is not None
    row = '#recent tr[data-task-id="live-0501"]'
    wait_until(shows(browser, row, "processing"), 10, message="the start, from an event")
    assert meetings.set_progress(message, 0.42, "transcribing")
    wait_until(shows(browser, f"{row} .pct", "42%"), 10, message="the progress, live")
    assert browser.execute_script("return window.sameDocument") is True

    quiet = stats_requests(recorder)  # no events: no requests (nothing polls)
    time.sleep(2.5)
    assert stats_requests(recorder) == quiet

    click(browser, f"{row} a.task-link")
    wait_until(shows(browser, "#t-history", "pushed", "started"), 10, message="the history")
    assert text_of(browser, "#t-progress") == "42%"
    assert meetings.set_progress(message, 0.75, "three quarters")
    wait_until(shows(browser, "#t-progress", "75%"), 10, message="the task page's progress")
    assert meetings.checkpoint(message, {"transcribe": {"words": 1200}})
    wait_until(shows(browser, "#t-steps", "transcribe", "1200"), 10, message="the steps")
    error = {
        "type": "DecodeError",
        "message": "live.wav: truncated",
        "traceback": 'Traceback (most recent call last):\n  File "steps.py", line 9',
    }
    assert meetings.fail(message, reason="error", error=error)
    wait_until(shows(browser, "#t-error", "DecodeError: live.wav: truncated"), 10)
    wait_until(shows(browser, "#t-traceback", "steps.py"), 10, message="the traceback")
    wait_until(shows(browser, "#t-history", "failed"), 10, message="the failure in history")
    assert browser.execute_script("return window.sameDocument") is True
    screenshot(browser, ARTIFACTS / "dashboard-task.png")
    assert console_errors(browser) == []
