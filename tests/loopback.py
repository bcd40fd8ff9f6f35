"""A real HTTP server on 127.0.0.1 for download tests: serves files from memory, honours Range
requests, and records every request. It can cut a response short once (an interrupted transfer)
or ignore Range headers (a server without resume support)."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    path: str
    range: str | None
    status: int
    sent: int  # body bytes written


class FileServer:
    def __init__(self, files: dict[str, bytes] | None = None):
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[Request] = []
        self.cut_after: dict[str, int] = {}  # path -> bytes after which the next response stops
        self.ignore_range: set[str] = set()
        self._lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def served(self, path: str) -> list[Request]:
        return [request for request in self.requests if request.path == path]

    def __enter__(self) -> FileServer:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                body = server.files.get(path)
                wanted = self.headers.get("Range")
                if body is None:
                    self.send_error(404, "Not Found")
                    server._record(Request(path, wanted, 404, 0))
                    return
                start, status = 0, 200
                if wanted and path not in server.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        server._record(Request(path, wanted, 416, 0))
                        return
                    status = 206
                chunk = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(chunk)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                with server._lock:
                    limit = server.cut_after.pop(path, None)
                sent = chunk if limit is None else chunk[:limit]
                self.wfile.write(sent)
                self.wfile.flush()
                self.close_connection = True
                server._record(Request(path, wanted, status, len(sent)))

        return Handler
