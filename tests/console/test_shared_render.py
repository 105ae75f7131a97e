"""Live fragments shared between consoles (console.consumers.shared_render)."""

from __future__ import annotations

import secrets
import time

from console.consumers import shared_render


def test_a_render_serves_consoles_whose_change_it_read_and_no_later_one() -> None:
    renders: list[str] = []

    def render() -> str:
        renders.append(f"render {len(renders) + 1}")
        return renders[-1]

    key = ("home", "every-run", secrets.token_hex(4))
    heard = time.monotonic()
    assert shared_render(key, heard, render) == "render 1"
    # Another console that heard of the same change before that render started: it is shown.
    assert shared_render(key, heard, render) == "render 1"
    # A console that heard of a newer change after the render started gets a fresh one.
    assert shared_render(key, time.monotonic() + 0.001, render) == "render 2"
    # Others who see other runs, or use other filters, never share it.
    assert shared_render(("home", "user-7", key[2]), heard, render) == "render 3"
    assert renders == ["render 1", "render 2", "render 3"]
