"""An upstream that echoes what reached it as JSON: proof of which headers Envoy forwarded."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Echo(BaseHTTPRequestHandler):
    server: EchoServer

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        self.server.hits += 1
        body = json.dumps(
            {
                "service": self.server.name,
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class EchoServer(ThreadingHTTPServer):
    """Serves on 127.0.0.1 in a daemon thread; ``hits`` counts requests that arrived."""

    daemon_threads = True

    def __init__(self, name: str, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Echo)
        self.name = name
        self.hits = 0
        self._thread = threading.Thread(target=self.serve_forever, name=f"echo-{name}", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> EchoServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m extauthz.devtools.upstream",
        description="Echo upstream on 127.0.0.1 (development only): the workload behind a "
        "sidecar that shares its network namespace, as in the compose demo.",
    )
    ap.add_argument("--name", required=True, help="the service name it reports")
    ap.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    server = EchoServer(args.name, args.port).start()
    stop = threading.Event()
    # As a container's PID 1 the kernel ignores SIGTERM without a handler.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"echo upstream {args.name!r} on 127.0.0.1:{server.port}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
