"""Local servers that receive alerts in tests: a minimal SMTP server (enough of RFC 5321 for
Django's SMTP backend) and a webhook receiver that can answer 500 a number of times first."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

from tests.support.http_stub import JsonReplyHandler, serving


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: Message


@dataclass
class Mailbox:
    port: int = 0
    mails: list[Mail] = field(default_factory=list)


class _SmtpHandler(socketserver.StreamRequestHandler):
    mailbox: Mailbox

    def reply(self, line: str) -> None:
        self.wfile.write(f"{line}\r\n".encode())

    def handle(self) -> None:
        self.reply("220 localhost test SMTP")
        sender, recipients = "", []
        while line := self.rfile.readline():
            command = line.decode().strip()
            verb = command[:4].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250 localhost")
            elif verb == "MAIL":
                sender, recipients = command.split(":", 1)[1].strip().strip("<>"), []
                self.reply("250 OK")
            elif verb == "RCPT":
                recipients.append(command.split(":", 1)[1].strip().strip("<>"))
                self.reply("250 OK")
            elif verb == "DATA":
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = b""
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                self.mailbox.mails.append(Mail(sender, recipients, message_from_bytes(data)))
                self.reply("250 OK queued")
            elif verb == "QUIT":
                self.reply("221 Bye")
                return
            else:  # RSET, NOOP and the rest
                self.reply("250 OK")


@contextmanager
def smtp_server() -> Iterator[Mailbox]:
    mailbox = Mailbox()
    handler = type("Handler", (_SmtpHandler,), {"mailbox": mailbox})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    mailbox.port = int(server.server_address[1])
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield mailbox
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class Hook:
    port: int = 0
    #: Answer 500 to this many posts before answering 200.
    fail_first: int = 0
    posts: list[dict[str, Any]] = field(default_factory=list)
    answered_500: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@contextmanager
def webhook_server(fail_first: int = 0) -> Iterator[Hook]:
    hook = Hook(fail_first=fail_first)

    class Handler(JsonReplyHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if hook.answered_500 < hook.fail_first:
                hook.answered_500 += 1
                self.send_json(500, b'{"error": "down"}')
                return
            hook.posts.append(json.loads(body))
            self.send_json(200, b'{"ok": true}')

    with serving(Handler, "webhook") as port:
        hook.port = port
        yield hook
