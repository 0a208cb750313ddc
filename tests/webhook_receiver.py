"""A real HTTP server on a free port that records the webhooks it is sent, and fails the
first `fail_first` of them with a 500, as a receiver that is briefly down does."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    body: bytes
    signature: str
    delivery: str
    answered: int


class Receiver:
    def __init__(self, fail_first: int = 0, delay: float = 0.0):
        self.fail_first, self.delay = fail_first, delay
        self.received: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if receiver.delay:
                    threading.Event().wait(receiver.delay)
                with receiver.lock:
                    code = 500 if len(receiver.received) < receiver.fail_first else 200
                    receiver.received.append(Received(body, self.headers.get("X-Farm-Signature", ""),
                                                      self.headers.get("X-Farm-Delivery", ""), code))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
