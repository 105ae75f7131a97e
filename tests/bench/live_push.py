"""Live push (issue 19): committed change -> message in a console, with 20 consoles connected.

The web server runs as deployed (gunicorn with one uvicorn worker per core, the Redis channel
layer). 20 console users, each logged in with a session cookie of their own, hold the home
page's websocket (``/ws/home/``) open, as the page's own script does, from a separate client
process (so the changes' driver does not slow the clients down). The driver commits changes
(run submissions through ``run_submit``, each a committed transaction that changes the home
page's counts and list) at a steady ``--push-rate`` per second. Each change is noted with its
commit time and the newest audit row id after it; a console has received the change when a
message arrives whose fragment carries that id or a newer one (``data-event-id``: the page's
catch-up mark). Latency = that message's arrival - the change's commit, for every change at
every console.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.run import Row

CONSOLES = 20
EVENT_ID = re.compile(rb'id="home-live" data-event-id="(\d+)"')


def console_sessions(n: int) -> list[str]:
    """Session cookies of ``n`` console users who may see every run (logged in as the login
    view would: Django's own ``login`` through the test client's ``force_login``)."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission
    from django.test import Client

    perms = list(
        Permission.objects.filter(content_type__app_label__in=["orchestration", "policies"])
    )
    cookies = []
    for index in range(n):
        user, _ = get_user_model().objects.get_or_create(username=f"console{index}")
        user.user_permissions.set(perms)
        client = Client()
        client.force_login(user)
        cookies.append(client.cookies["sessionid"].value)
    return cookies


def _consoles(port: int, cookies: list[str], stop: Any, out: str) -> None:
    """The client process: hold one websocket per cookie until ``stop`` is set (and 3 s more,
    for the last changes' messages); write every message's (arrival time, event id, console)
    to ``out``."""
    import websockets

    received: list[tuple[float, int, int]] = []
    connected: list[int] = []

    async def console(index: int, cookie: str) -> None:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws/home/",
            additional_headers={"Cookie": f"sessionid={cookie}"},
            origin=f"http://127.0.0.1:{port}",  # type: ignore[arg-type]  # a str is what it sends
            max_size=None,
        ) as socket:
            connected.append(index)
            stopping: float | None = None
            while stopping is None or time.monotonic() - stopping < 3.0:
                if stopping is None and stop.is_set():
                    stopping = time.monotonic()
                try:
                    message = await asyncio.wait_for(socket.recv(decode=False), 0.2)
                except TimeoutError:
                    continue
                arrival = time.time()
                found = EVENT_ID.search(message[:300])
                if found:
                    received.append((arrival, int(found.group(1)), index))

    async def main() -> None:
        await asyncio.gather(*(console(i, c) for i, c in enumerate(cookies)))

    asyncio.run(main())
    Path(out).write_text(json.dumps({"connected": len(connected), "received": received}))


def bench_push(port: int, rate: float, seconds: float, consoles: int = CONSOLES) -> Row:
    """Commit ``rate`` changes per second for ``seconds`` while ``consoles`` consoles listen."""
    from audit.selectors import latest_audit_event_id
    from orchestration.services import run_submit

    cookies = console_sessions(consoles)
    handle, name = tempfile.mkstemp(prefix="signalbox-push-", suffix=".json")
    os.close(handle)
    out = Path(name)
    settle = 3.0  # connect, and the first render each socket gets on connect
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    client = ctx.Process(target=_consoles, args=(port, cookies, stop, str(out)))
    client.start()
    time.sleep(settle)
    changes: list[tuple[float, int]] = []
    n = int(rate * seconds)
    start = time.monotonic()
    for k in range(n):
        due = start + k / rate
        if (pause := due - time.monotonic()) > 0:
            time.sleep(pause)
        run_submit(workflow="reference_workload", input={})
        committed = time.time()
        changes.append((committed, latest_audit_event_id()))
    elapsed = time.monotonic() - start
    stop.set()
    client.join(60)
    data = json.loads(out.read_text())
    out.unlink()
    by_console: dict[int, list[tuple[float, int]]] = {}
    for arrival, event_id, index in data["received"]:
        by_console.setdefault(index, []).append((arrival, event_id))
    row = Row(f"live push, {consoles} consoles (home), {rate:.0f} changes/s", n)
    row.seconds = elapsed
    missed = 0
    for messages in by_console.values():
        messages.sort()
        i = 0
        for committed, event_id in changes:
            while i < len(messages) and messages[i][1] < event_id:
                i += 1
            if i == len(messages):
                missed += 1
                continue
            row.latencies_ms.append((messages[i][0] - committed) * 1000)
    missed += (consoles - len(by_console)) * n
    messages_total = sum(len(m) for m in by_console.values())
    row.note = (
        f"{data['connected']} of {consoles} consoles connected; {messages_total} messages "
        f"({messages_total / max(len(by_console), 1) / elapsed:.1f}/s per console); "
        f"{missed} change-console pairs never seen"
    )
    return row
