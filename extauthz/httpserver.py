"""The HTTP transport: Envoy's ext_authz ``http_service``, on asyncio (uvloop) and httptools.

Envoy asks over HTTP/1.1 with the client's method, path and headers; a 200 allows, any other
status denies and goes to the client as it is (:func:`~extauthz.response.encode_http_response`).
The same Authorizer, limit, telemetry and decision log as the gRPC listener
(:class:`~extauthz.checks.CheckRecorder`). It exists for speed: grpc.aio costs ~240 µs of
CPU per call on the reference machine, this transport a small part of that
(``loadtest/README.md``).

Identity comes from the ``x-extauthz-peer`` header Envoy sets from its own view of the
connection (:data:`~extauthz.request.PEER_HEADER`). Whoever can reach this listener can
claim any identity, so it binds only a loopback address or a Unix socket: the Envoy beside
extauthz, in the same pod or host.

One request at a time per connection, in order: Envoy does not pipeline, and a request
that must wait for a JWKS refetch holds the ones behind it until it is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections import deque
from typing import Any

import httptools

from .checks import FAILED, CheckRecorder, Metadata
from .decision import Decision
from .errors import ConfigError, ExtAuthzError
from .request import TIMEOUT_HEADER, CheckInput, from_http
from .response import DEFAULT_UPSTREAM_NAMES, UpstreamNames, encode_http_response

log = logging.getLogger(__name__)

# Kept back from Envoy's timeout to send the answer (as the gRPC listener's margin).
DEADLINE_MARGIN_SECONDS = 0.02
MAX_HEADER_BYTES = 64 * 1024  # Envoy's own default limit on request headers is 60 KiB
MAX_HEADERS = 256  # ... and on their number, 100
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

_BAD_BODY = b"extauthz: malformed HTTP request"
_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\n"
    + f"content-length: {len(_BAD_BODY)}\r\n\r\n".encode()
    + _BAD_BODY
)
_LAST_RESORT = {ka: encode_http_response(FAILED, keep_alive=ka) for ka in (True, False)}

Request = tuple[str, str, dict[str, str], bool]  # method, target, headers, keep-alive


def parse_listen(listen: str, flag: str = "--http-listen") -> tuple[str, int] | str:
    """``HOST:PORT`` (loopback only) as (host, port), or ``unix:/path`` as the path."""
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        if not path.startswith("/"):
            raise ConfigError(f"{flag} {listen!r}: expected unix:/absolute/path")
        return path
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{flag} {listen!r}: expected HOST:PORT or unix:/path")
    if host not in LOOPBACK:
        raise ConfigError(
            f"{flag} {listen}: only a loopback address (127.0.0.1, [::1], localhost) or "
            "unix:/path: the listener trusts the identity header Envoy sets, so only the "
            "Envoy beside extauthz may reach it"
        )
    return host, int(port)


class HttpCheckServer:
    """The listener: start, the port it got, stop with in-flight requests answered."""

    def __init__(
        self,
        recorder: CheckRecorder,
        listen: str,
        *,
        path_prefix: str = "",
        upstream: UpstreamNames = DEFAULT_UPSTREAM_NAMES,
    ) -> None:
        self.recorder = recorder
        self.upstream = upstream
        self.listen = listen
        self.address = parse_listen(listen)
        if path_prefix and (not path_prefix.startswith("/") or path_prefix.endswith("/")):
            raise ConfigError(
                f"--http-path-prefix {path_prefix!r}: expected /name (Envoy's path_prefix, "
                "with no trailing slash)"
            )
        self.path_prefix = path_prefix
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if isinstance(self.address, str):
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.lstat(self.address).st_mode):
                        os.unlink(self.address)  # a socket left by a process that died
                server = await loop.create_unix_server(lambda: _Connection(self), self.address)
                os.chmod(self.address, 0o660)  # owner and group: the Envoy beside extauthz
            else:
                host, port = self.address
                server = await loop.create_server(lambda: _Connection(self), host, port)
                self.port = server.sockets[0].getsockname()[1]
        except OSError as exc:
            raise ConfigError(f"--http-listen {self.listen}: cannot bind: {exc}") from exc
        self._server = server

    async def stop(self, grace: float) -> None:
        """Stop accepting, answer what is in flight (within ``grace`` s), close the rest."""
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for conn in list(self._connections):
            conn.close()
        await self._server.wait_closed()
        self._server = None
        if isinstance(self.address, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)

    # --- one request ------------------------------------------------------------------

    def handle(self, conn: _Connection, request: Request) -> None:
        """Answer ``request`` now, or start the task that waits for a JWKS refetch."""
        method, target, headers, keep_alive = request
        recorder = self.recorder
        start = time.perf_counter_ns()
        wall = time.time_ns()
        if recorder.over_limit():
            self._shed(conn, request, start, wall)
            return
        telemetry = recorder.telemetry
        telemetry.in_flight += 1
        try:
            timeout = headers.get(TIMEOUT_HEADER)
            try:
                inp: CheckInput | None = from_http(method, target, headers, self.path_prefix)
            except ExtAuthzError as exc:
                inp = None
                decision = recorder.authorizer.refuse(exc)
            snapshot = recorder.snapshot()
            if inp is not None:
                decision, pending, policies = recorder.authorizer.check_now(inp)
                if pending is not None:
                    wait = _wait(recorder, timeout)
                    task = asyncio.get_running_loop().create_task(
                        self._later(
                            conn, inp, decision, pending, policies, wait, request, start, wall
                        )
                    )
                    conn.hold()
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    return  # the task answers, and counts the check out
        except Exception:
            log.exception("cannot decide an HTTP check; denying")
            telemetry.in_flight -= 1
            self._last_resort(conn, None, start, wall, keep_alive)
            return
        try:
            self._answer(conn, decision, inp, snapshot, start, wall, keep_alive)
        finally:
            telemetry.in_flight -= 1

    async def _later(
        self,
        conn: _Connection,
        inp: CheckInput,
        decision: Decision,
        pending: Any,
        policies: Any,
        wait: float,
        request: Request,
        start: int,
        wall: int,
    ) -> None:
        keep_alive = request[3]
        recorder = self.recorder
        try:
            try:
                decision = await recorder.authorizer.check_again(
                    inp, decision, pending, policies, wait=wait
                )
            except Exception:  # never the caller's allow: the first decision was a deny
                log.exception("cannot decide an HTTP check after a JWKS refetch; denying")
                self._last_resort(conn, inp, start, wall, keep_alive)
                return
            except BaseException:  # cancelled (the loop is closing): still one answer
                self._last_resort(conn, inp, start, wall, keep_alive)
                raise
            snapshot = policies if recorder.recent is not None else None
            self._answer(conn, decision, inp, snapshot, start, wall, keep_alive)
        finally:
            recorder.telemetry.in_flight -= 1
            conn.resume()

    def _answer(
        self,
        conn: _Connection,
        decision: Decision,
        inp: CheckInput | None,
        snapshot: Any,
        start: int,
        wall: int,
        keep_alive: bool,
    ) -> None:
        try:
            response = encode_http_response(decision, keep_alive=keep_alive, upstream=self.upstream)
        except Exception:
            log.exception("cannot encode decision %s; denying", decision.decision_id)
            self._last_resort(conn, inp, start, wall, keep_alive)
            return
        decided = wall + time.perf_counter_ns() - start
        conn.send(response, keep_alive)
        self.recorder.finish(decision, inp, snapshot, start, wall, decided, _metadata(self, inp))

    def _shed(self, conn: _Connection, request: Request, start: int, wall: int) -> None:
        method, target, headers, keep_alive = request
        inp: CheckInput | None = None
        try:
            try:  # read only for the log and the span; unreadable, it is shed all the same
                inp = from_http(method, target, headers, self.path_prefix)
            except ExtAuthzError:
                inp = None
            decision = self.recorder.shed()
            response = encode_http_response(decision, keep_alive=keep_alive)
        except Exception:
            log.exception("cannot shed an HTTP check; denying")
            self._last_resort(conn, inp, start, wall, keep_alive)
            return
        conn.send(response, keep_alive)
        self.recorder.record_undecided(decision, inp, start, wall, _metadata(self, inp))

    def _last_resort(
        self, conn: _Connection, inp: CheckInput | None, start: int, wall: int, keep_alive: bool
    ) -> None:
        conn.send(_LAST_RESORT[keep_alive], keep_alive)
        self.recorder.record_undecided(FAILED, inp, start, wall, _metadata(self, inp))


class _TooLarge(ValueError):
    """A request over the listener's limits (answered 400, logged without a traceback)."""


def _metadata(server: HttpCheckServer, inp: CheckInput | None) -> Metadata:
    """What spans and the decision log read the trace context from: over HTTP, the check's
    headers (Envoy puts its ext_authz span's traceparent there), only when they read it."""
    if inp is None or not server.recorder.wants_metadata:
        return ()
    return inp.headers.items()


def _wait(recorder: CheckRecorder, timeout: str | None) -> float:
    """How long a check may wait for a JWKS refetch: the fetch timeout, within Envoy's."""
    wait = recorder.authorizer.settings.jwks.timeout
    if timeout is not None and timeout.isdigit():
        wait = min(wait, int(timeout) / 1000 - DEADLINE_MARGIN_SECONDS)
    return wait


def _headers(names: list[bytes], values: list[bytes]) -> dict[str, str] | None:
    """The headers as a CheckRequest has them: lower-case names, repeated ones comma-joined
    (Envoy joins them already). None when they are larger than :data:`MAX_HEADER_BYTES`."""
    joined_names, joined_values = b"\n".join(names), b"\n".join(values)
    if len(joined_names) + len(joined_values) > MAX_HEADER_BYTES:
        return None
    names_text = joined_names.decode("latin-1")
    keys = (names_text if names_text.islower() else names_text.lower()).split("\n")
    texts = joined_values.decode("utf-8", "replace").split("\n")
    if len(texts) != len(keys):  # a value with a line feed in it (an obsolete folded line)
        texts = [v.decode("utf-8", "replace") for v in values]
    headers = dict(zip(keys, texts))  # noqa: B905 (equal lengths: checked above)
    if len(headers) != len(keys):
        headers = {}
        for key, text in zip(keys, texts, strict=True):
            old = headers.get(key)
            headers[key] = text if old is None else f"{old},{text}"
    return headers


class _Connection(asyncio.Protocol):
    """One connection from Envoy: httptools parses, the server answers in order."""

    def __init__(self, server: HttpCheckServer) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: Any = None  # an asyncio.Transport (uvloop's is not a subclass)
        self._url = b""
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self.busy = False  # a request waits for a JWKS refetch: the next ones queue
        self._queued: deque[Request] = deque()
        # Per request not answered yet, oldest first: whether it is a HEAD (Envoy asks with
        # the client's method), whose answer must carry no body.
        self._heads: deque[bool] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # Our own callback failed: a limit below (one line), or a bug (its traceback).
            cause = exc.__context__
            log.warning(
                "cannot read an HTTP check (%s); answering 400",
                cause or exc,
                exc_info=not isinstance(cause, _TooLarge),
            )
            self._refuse()
        except httptools.HttpParserUpgrade:
            # An upgrade or CONNECT request was read whole and is answered (or queued) as any
            # other, with connection: close (on_message_complete): the parser reads no
            # further. A 400 here would be a second answer to that one request.
            pass
        except httptools.HttpParserError:
            self._refuse()

    def _refuse(self) -> None:
        """Not an HTTP/1.1 request we can read: 400, and the connection closes (Envoy
        answers its client with its ``status_on_error``, a deny)."""
        if self._transport is not None:
            self._transport.write(_BAD_REQUEST)
            self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._names = []
        self._values = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_HEADER_BYTES:
            raise _TooLarge(f"request target over {MAX_HEADER_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called per header: only collect. Decoding the whole lot at once at the end costs
        # a few C calls instead of ~1 µs of Python per header (20 headers a check).
        self._names.append(name)
        self._values.append(value)
        if len(self._names) > MAX_HEADERS:
            raise _TooLarge(f"more than {MAX_HEADERS} request headers")

    def on_message_complete(self) -> None:
        parser = self._parser
        headers = _headers(self._names, self._values)
        if headers is None:
            self._refuse()
            return
        request = (
            parser.get_method().decode("latin-1"),
            self._url.decode("utf-8", "replace"),
            headers,
            parser.should_keep_alive()
            and not parser.should_upgrade()
            and not self._server._closing,
        )
        self._heads.append(request[0] == "HEAD")
        if self.busy:
            self._queued.append(request)
        else:
            self._server.handle(self, request)

    # answers
    def send(self, response: bytes, keep_alive: bool) -> None:
        """Write the answer of the oldest request not answered yet (answers go in order)."""
        head = self._heads.popleft() if self._heads else False
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # Envoy went away (its timeout): nobody to tell
        if head:  # the answer to a HEAD has its headers only (RFC 9110 9.3.2)
            response = response[: response.find(b"\r\n\r\n") + 4]
        transport.write(response)
        if not keep_alive:
            transport.close()

    def hold(self) -> None:
        """A request waits for a JWKS refetch: queue those behind it, read no more."""
        self.busy = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume(self) -> None:
        """The waiting request is answered: answer those queued behind it, in order."""
        self.busy = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
        while self._queued and not self.busy:
            self._server.handle(self, self._queued.popleft())

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
