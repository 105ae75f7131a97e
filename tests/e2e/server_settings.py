"""The browser tests' web process: the project's settings with DEBUG off (so 403, 404 and 500
are the pages people get), serving static files from the finders (the tests collect none)."""

from console.settings import *  # noqa: F403

SERVESTATIC_USE_FINDERS = True
SERVESTATIC_AUTOREFRESH = True
