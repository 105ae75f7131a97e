"""Websockets that keep the console's pages current.

A live event is only a hint that something changed; the consumer re-reads through the same
selectors as the page and sends the page's sections as HTML whose root elements have ids, which
the htmx websocket extension swaps in place. Bursts of events are coalesced into one render.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.utils import timezone

from console.live_auth import (
    CLOSE_FORBIDDEN,
    CLOSE_UNAUTHENTICATED,
    live_user_now,
    session_group,
)
from console.views import run_list_fragment, run_live_fragment
from console.views_inbox import (
    home_fragment,
    inbox_fragment,
    inbox_item_fragment,
    inbox_item_run_id,
)
from orchestration.live import INBOX_GROUP, RUNS_GROUP, run_group
from orchestration.selectors import run_is_visible, visibility_key

#: Fragments rendered lately, by (page, who sees the same runs, filters, time zone): when
#: their render started (``time.monotonic()``) and their HTML.
_RENDERS: dict[tuple[str, ...], tuple[float, str]] = {}
#: How long a fragment may be reused at most (its relative times age).
SHARED_RENDER_SECONDS = 1.0


def shared_render(key: tuple[str, ...], since: float, render: Callable[[], str]) -> str:
    """The fragment for ``key`` whose render started after ``since`` (when the caller heard of
    the newest change it must show: that change was committed before, so such a render read
    it), if one started within the last second; else ``render()``. The consoles of people who
    see the same runs share one render per burst of changes in a web process instead of one
    each (renders run one at a time in the process's database thread, so the first console's
    render serves the others)."""
    key = (*key, timezone.get_current_timezone_name())
    now = time.monotonic()
    cached = _RENDERS.get(key)
    if cached is not None and cached[0] >= since and now - cached[0] < SHARED_RENDER_SECONDS:
        return cached[1]
    html = render()
    if len(_RENDERS) > 1000:
        _RENDERS.clear()
    _RENDERS[key] = (now, html)
    return html


class LiveFragmentConsumer(AsyncWebsocketConsumer):
    """Joins one channel-layer group and answers its events with re-rendered fragments."""

    #: At most one render per this many seconds: the first event after a quiet spell renders at
    #: once; events during a render or within this interval of the last one share the next.
    debounce = 0.25

    group: str | None = None
    #: More groups whose events also make this page render (joined and left with ``group``).
    extra_groups: tuple[str, ...] = ()
    session_group: str | None = None
    _render_task: asyncio.Task[None] | None = None
    _dirty = False
    _rendered_at = float("-inf")
    #: When the newest event (or catch-up request) reached this consumer (``time.monotonic()``).
    _event_at = float("-inf")

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not await self.allowed(user):
            await self.close()
            return
        self.user = user
        self.group = self.group_name()
        for group in (self.group, *self.extra_groups):
            await self.channel_layer.group_add(group, self.channel_name)
        key = getattr(self.scope.get("session"), "session_key", None)
        if key:  # a logout in any tab closes this socket (console.live_auth)
            self.session_group = session_group(key)
            await self.channel_layer.group_add(self.session_group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self._render_task is not None:
            self._render_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._render_task
        if self.group is not None:
            for group in (self.group, *self.extra_groups):
                await self.channel_layer.group_discard(group, self.channel_name)
        if self.session_group is not None:
            await self.channel_layer.group_discard(self.session_group, self.channel_name)

    async def session_ended(self, message: dict[str, Any]) -> None:
        """The session this socket was opened with logged out."""
        await self.close(code=CLOSE_UNAUTHENTICATED)

    async def run_event(self, message: dict[str, Any]) -> None:
        """A ``run.event`` from ``orchestration.live``: schedule a render."""
        self.note_event(message.get("event") or {})
        self._event_at = time.monotonic()
        self._dirty = True
        if self._render_task is None or self._render_task.done():
            self._render_task = asyncio.create_task(self._render_soon())

    async def _render_soon(self) -> None:
        loop = asyncio.get_running_loop()
        while self._dirty:
            if (pause := self._rendered_at + self.debounce - loop.time()) > 0:
                await asyncio.sleep(pause)
            self._dirty = False
            self._rendered_at = loop.time()
            code, html = await database_sync_to_async(self._recheck_and_render)()
            if code is not None:
                await self.close(code=code)
                return
            if html is None:  # no longer visible to this user
                await self.close()
                return
            await self.send(text_data=html)

    def _recheck_and_render(self) -> tuple[int | None, str | None]:
        """Re-check the user (console.live_auth), then render for them: one trip to the
        database thread per push (the consoles of a web process queue on that one thread).
        Returns the close code if the user may no longer have this socket, else the HTML."""
        session = self.scope.get("session")
        user, code = live_user_now(getattr(session, "session_key", None))
        if code is None and not self.allowed_now(user):
            code = CLOSE_FORBIDDEN
        if code is not None:
            return code, None
        self.user = user  # fresh: permissions lost since the last push narrow this render
        return None, self.render()

    async def allowed(self, user: Any) -> bool:
        return await database_sync_to_async(self.allowed_now)(user)

    # --- what subclasses define --------------------------------------------------------------------

    def allowed_now(self, user: Any) -> bool:
        """Whether ``user`` may have this socket (called in the database thread)."""
        return True

    def group_name(self) -> str:
        raise NotImplementedError

    def note_event(self, event: dict[str, Any]) -> None:
        """Look at an event before rendering (e.g. to decide what to include)."""

    def render(self) -> str | None:
        raise NotImplementedError


class RunConsumer(LiveFragmentConsumer):
    """``/ws/runs/<id>/``: one run's page, for users who may see that run."""

    _include_io = False

    @property
    def run_id(self) -> int:
        return int(self.scope["url_route"]["kwargs"]["run_id"])

    def allowed_now(self, user: Any) -> bool:
        return run_is_visible(user, self.run_id)

    def group_name(self) -> str:
        return run_group(self.run_id)

    def note_event(self, event: dict[str, Any]) -> None:
        # Inputs and outputs sit in <details> a reader may have opened; re-send them (closing
        # them) only when the run itself changed status, e.g. when its output appears.
        if event.get("kind") == "run":
            self._include_io = True

    def render(self) -> str | None:
        include_io, self._include_io = self._include_io, False
        return run_live_fragment(self.user, self.run_id, include_io=include_io)


class RunListConsumer(LiveFragmentConsumer):
    """``/ws/runs/``: the first page of the run list (``?status=`` and ``?waiting=`` as on the
    page)."""

    debounce = 1.0

    def group_name(self) -> str:
        return RUNS_GROUP

    def render(self) -> str | None:
        query = parse_qs(self.scope.get("query_string", b"").decode())
        return run_list_fragment(
            self.user,
            status=(query.get("status") or [""])[0],
            waiting=(query.get("waiting") or [""])[0],
        )


class CatchUpConsumer(LiveFragmentConsumer):
    """A page that renders from the database on (re)connect and when the client asks for a
    catch-up (``{"catchup": <last event id>}``), so nothing missed while offline stays stale."""

    debounce = 0.1

    def group_name(self) -> str:
        return RUNS_GROUP

    async def connect(self) -> None:
        await super().connect()
        if self.group is not None:  # accepted
            await self.run_event({})

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.run_event({})


class HomeConsumer(CatchUpConsumer):
    """``/ws/home/``: the home page's counts and list (its filters in the query string)."""

    def render(self) -> str | None:
        query = self.scope.get("query_string", b"").decode()
        return shared_render(
            ("home", visibility_key(self.user), query),
            self._event_at,
            lambda: home_fragment(self.user, query),
        )


class InboxConsumer(CatchUpConsumer):
    """``/ws/inbox/``: the decisions this user may see (and which of them they may take), and
    who holds a claim on each (claims are announced to the inbox's own group); its filters in
    the query string."""

    extra_groups = (INBOX_GROUP,)

    def render(self) -> str | None:
        return inbox_fragment(self.user, self.scope.get("query_string", b"").decode())


class InboxItemConsumer(CatchUpConsumer):
    """``/ws/inbox/<wait_id>/``: one item's claim and whether it is still open, for users who
    may see its run; it hears its run's events (claims included)."""

    run_id: int | None = None

    @property
    def wait_id(self) -> int:
        return int(self.scope["url_route"]["kwargs"]["wait_id"])

    def allowed_now(self, user: Any) -> bool:
        self.run_id = inbox_item_run_id(user, self.wait_id)
        return self.run_id is not None

    def group_name(self) -> str:
        assert self.run_id is not None
        return run_group(self.run_id)

    def render(self) -> str | None:
        return inbox_item_fragment(self.user, self.wait_id)
