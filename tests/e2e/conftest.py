"""What the browser tests share: one uvicorn process per module serving the console against the
test database (stoppable and restartable on its port), one Chromium per module, logged-in pages,
axe, and the pages' CSP refusals.

The web process lives across the module's tests while each test's flush empties the database:
the tests restore the migrations' rows with their ids (``serialized_rollback``), so what the
web process cached (content types, the default tenant) stays true.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "screenshots"
PASSWORD = "correct horse battery staple"

#: What every browser test module marks itself with.
E2E = [pytest.mark.e2e, pytest.mark.django_db(transaction=True, serialized_rollback=True)]


@pytest.fixture(scope="session", autouse=True)
def _sync_orm_beside_playwright() -> Iterator[None]:
    """Playwright's sync API keeps an event loop on this thread; the test's own ORM calls are
    still plain synchronous ones."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WebServer:
    """uvicorn serving ``console.asgi`` as production does (DEBUG off, so error pages are the
    real ones), on a fixed port across stops and starts."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="web-", suffix=".log")[1])

    def start(self, timeout: float = 30.0) -> None:
        db = settings.DATABASES["default"]
        env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "PYTHONPATH": str(ROOT),
            "DJANGO_SETTINGS_MODULE": "tests.e2e.server_settings",
            "DEBUG": "false",
        }
        with self.log_path.open("a") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "console.asgi:application",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    # An open console's websocket must not hold a stop up.
                    "--timeout-graceful-shutdown",
                    "3",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.log_path.read_text()[-3000:]) from None
                time.sleep(0.05)
        raise RuntimeError(f"uvicorn not listening after {timeout}s: {self.log()}")

    def stop(self) -> None:
        """Stops the server as a deploy does (SIGTERM, connections closed within the graceful
        shutdown's time); a server that has not exited 15 s later is killed with its group, so a
        stuck shutdown fails no test and leaves no process behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def web(_broker_clean: None) -> Iterator[WebServer]:
    server = WebServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(web: WebServer) -> str:
    """The running console's base URL."""
    if web.proc is None:  # a test stopped it and failed before starting it again
        web.start()
    return web.url


@pytest.fixture
def engine_in_process(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs are driven in this process (the ``drive`` fixture): agents take no time, a failed
    attempt is retried at once, no task message is left in the broker for a later test's
    workers; live events go out to the web process as a worker's do."""
    settings.SIGNALBOX = {**settings.SIGNALBOX, "AGENT_TIME_SCALE": 0.0, "RETRY_BASE_SECONDS": 0.0}
    from console.celery import app

    app.conf.broker_url  # noqa: B018  (as tests/console/conftest.py explains)
    monkeypatch.setitem(app.conf, "broker_url", "memory://")
    settings.CELERY_BROKER_URL = "memory://"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
    )
    if not executable:
        pytest.skip("no chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser profile (cookies, storage) for one test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context
    context.close()


#: Collects the page's securitypolicyviolation events (added before any script of the page runs).
CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(
    `${e.effectiveDirective} refused ${e.blockedURI || "inline"} at ${e.sourceFile}:${e.lineNumber}:${e.columnNumber}`
  );
});
"""


def csp_violations(page: Any) -> list[str]:
    """The securitypolicyviolation events the page has seen (see :data:`CSP_LISTENER`)."""
    return list(page.evaluate("window.__cspViolations || []"))


def watch(page: Any) -> Any:
    """Record what the page's CSP refused and any script error on ``page.refused``."""
    page.add_init_script(CSP_LISTENER)
    page.refused = []
    page.on(
        "console",
        lambda message: (
            "Content Security Policy" in message.text and page.refused.append(message.text)
        ),
    )
    page.on("pageerror", lambda error: page.refused.append(str(error)))
    return page


def login(context: Any, server: str, username: str) -> Any:
    """A page of ``context`` logged in through the login form, on home."""
    page = watch(context.new_page())
    page.goto(f"{server}/accounts/login/")
    page.fill('input[name="username"]', username)
    page.fill('input[name="password"]', PASSWORD)
    page.click('button[type="submit"]')
    page.wait_for_url(f"{server}/")
    return page


def signed_in(context: Any, server: str, user: Any) -> Any:
    """A page of ``context`` with ``user``'s session cookie (no trip through the login form)."""
    client = Client()
    client.force_login(user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
    context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": cookie, "url": server}])
    return watch(context.new_page())


def shot(page: Any, name: str, *, full_page: bool = True) -> None:
    """Save docs/screenshots/<name>.png (the README shows them)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)
