"""Container health check for the web process: exit 0 when ``/api/v1/health`` answers 200.

    python deploy/healthcheck.py

Production settings refuse a Host that is not in ``ALLOWED_HOSTS`` and redirect plain HTTP to
HTTPS, so the probe presents the first allowed host and the header a TLS-terminating proxy adds.
Standard library only: it runs in the slim image without curl.
"""

from __future__ import annotations

import http.client
import os
import sys


def probe_host() -> str:
    for host in os.environ.get("ALLOWED_HOSTS", "").split(","):
        host = host.strip().lstrip(".")
        if host and host != "*":
            return host
    return "localhost"


def main() -> int:
    port = int(os.environ.get("PORT", "8000"))
    timeout = float(os.environ.get("HEALTHCHECK_TIMEOUT", "5"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(
            "GET",
            "/api/v1/health",
            headers={"Host": probe_host(), "X-Forwarded-Proto": "https"},
        )
        status = connection.getresponse().status
    except OSError as error:
        print(f"health check failed: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if status != 200:
        print(f"health check failed: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
