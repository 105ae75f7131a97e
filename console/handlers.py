"""The ASGI handler for HTTP: Django's, with each request handled in one hop to a thread of a
pool kept for the process.

Django's own ASGI handler runs an asynchronous middleware chain. Every middleware written the
classic way (all of Django's, ours) then hops to the request's thread and back for each of its
hooks (``process_request``, ``process_view``, ``process_response``), and the view hops once more:
seventeen round trips between the event loop and the thread per request, each about 0.2 ms of
CPU on a small machine, more than the view itself costs. Every view here is synchronous, so this
handler loads the chain in synchronous mode, as Django does under WSGI and in its test client.

And it goes further, as a WSGI server's thread does: the request's signals, the middleware
chain, the view and the response's ``close`` (which sends ``request_finished``: the thread's
database connection is kept, returned to the pool or closed, as configured) run in ONE call on a thread of a pool that lives as long as the
process. Django's handler starts a new thread for every request (asgiref's
``ThreadSensitiveContext``), hops to it twice more (the signals, the close) and runs a task that
watches for a disconnect beside the view, which a synchronous view cannot be stopped by anyway.
What stays on the event loop: reading the body and sending the response. A streaming response
(a static file) is sent as Django sends it and closed afterwards on the pool.

Measured against Django's handler in interleaved pairs (docs/benchmarks.md). tests/console/
test_asgi_matches_django.py pins it to Django's handler: the same requests get the same answers,
cookies and signals.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from io import IOBase
from typing import Any

from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http.response import FileResponse, HttpResponseBase
from django.urls import set_script_prefix

#: Requests a web process works on at once (the rest wait on the event loop, already read).
#: Each thread holds a database connection while it works: keep it within the pool's size.
THREADS = int(os.environ.get("WEB_THREADS", "8"))


class OneHopASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self.executor = ThreadPoolExecutor(THREADS, thread_name_prefix="request")

    def load_middleware(self, is_async: bool = False) -> None:
        # Django's ASGIHandler asks for the asynchronous chain; this handler runs the synchronous
        # one (an async-only middleware in it is adapted by Django, at the cost of its hops).
        super().load_middleware(is_async=False)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        loop = asyncio.get_running_loop()
        try:
            response = await loop.run_in_executor(self.executor, self._respond, scope, body_file)
            await self.send_response(response, send)
            if response.streaming:
                await loop.run_in_executor(self.executor, response.close)
        finally:
            body_file.close()

    def _respond(self, scope: dict[str, Any], body_file: IOBase) -> HttpResponseBase:
        """On a thread of the pool: the request from start to its response, closed unless it
        streams (its content is sent after)."""
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        request, response = self.create_request(scope, body_file)
        if request is not None:
            response = self.get_response(request)
            response._handler_class = self.__class__  # type: ignore[attr-defined]  # as Django's handler marks it
            if isinstance(response, FileResponse):
                response.block_size = self.chunk_size  # the server chunks it (as Django's does)
        assert response is not None
        if not response.streaming:
            response.close()
        return response
