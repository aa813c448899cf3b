"""JWKS from the network: ``jwksUri`` over http(s) and OIDC discovery, refreshed off the
request path.

A :class:`RemoteKeySet` owns one background thread that fetches its document, honours the
HTTP cache headers within ``[min_refetch_interval, refresh_interval]``, backs off on failure
and keeps the last good keys while the IdP is down. A Check only ever reads
:attr:`RemoteKeySet.state` (one tuple, swapped whole); on an unknown ``kid`` it may ask for
one early refetch, which the rate limit grants at most once per ``min_refetch_interval``, so a
flood of made-up kids costs the IdP one request per interval, not one per Check.

A :class:`KeySetRegistry` shares one set per URL across policy reloads, so a reload neither
refetches every issuer nor forgets keys, and stops the sets no policy uses any more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import NamedTuple

from ..errors import ConfigError, JwksError
from .jwt import Jwk, compile_jwks

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"
_USER_AGENT = "extauthz-jwks/1"
# Its own instance, so that it never disturbs (nor is disturbed by) the global one.
_JITTER = random.Random()  # noqa: S311 - backoff jitter, not a secret


@dataclass(frozen=True, slots=True)
class FetchSettings:
    """How remote key sets are fetched; one value for the whole server (``--jwks-*``).

    ``refresh_interval`` is the longest a document is kept (a longer ``max-age`` is cut to
    it, so that a rotation is seen within it); ``min_refetch_interval`` is the shortest (a
    ``no-cache`` or tiny ``max-age`` is raised to it) and the unknown-kid rate limit.
    """

    refresh_interval: float = 600.0
    min_refetch_interval: float = 30.0
    timeout: float = 5.0
    max_backoff: float = 300.0
    ca_file: str | None = None
    max_bytes: int = 1024 * 1024


class HttpResponse(NamedTuple):
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


# (url, request headers, timeout) -> response; raises OSError/ValueError when nothing came back
HttpGet = Callable[[str, Mapping[str, str], float], HttpResponse]


class _NoRedirectToHttp(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never from https down to plain http."""

    def redirect_request(  # type: ignore[no-untyped-def]
        self, req, fp, code, msg, headers, newurl
    ) -> urllib.request.Request | None:
        if req.full_url.startswith("https:") and not newurl.startswith("https:"):
            raise urllib.error.HTTPError(newurl, code, "redirect from https to http", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def urllib_getter(settings: FetchSettings) -> HttpGet:
    """A blocking HTTP GET with TLS verification (system CAs, or ``ca_file``) and a size cap."""
    try:
        context = ssl.create_default_context(cafile=settings.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--jwks-ca-file {settings.ca_file}: {exc}") from exc
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _NoRedirectToHttp()
    )

    def get(url: str, headers: Mapping[str, str], timeout: float) -> HttpResponse:
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked at load
            url, headers={"User-Agent": _USER_AGENT, "Accept": "application/json", **headers}
        )
        try:
            response = opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code != 304:
                raise
            response = exc  # 304 Not Modified arrives as an "error" in urllib
        with response:
            body = response.read(settings.max_bytes + 1)
            if len(body) > settings.max_bytes:
                raise ValueError(f"document larger than {settings.max_bytes} bytes")
            names = {k.lower(): v for k, v in response.headers.items()}
            return HttpResponse(response.status, names, body)

    return get


class KeyState(NamedTuple):
    """What a Check reads, in one consistent piece."""

    keys: tuple[Jwk, ...]
    revision: int  # bumped whenever the keys change: cached verifications under older ones lapse


@dataclass(slots=True)
class FetchStats:
    """Counters, read by metrics and the admin service."""

    fetches: int = 0  # HTTP requests that completed the fetch of a document (200 or 304)
    failures: int = 0
    not_modified: int = 0
    refetches: int = 0  # early refetches granted for an unknown kid
    refetches_limited: int = 0  # ... and refused by the rate limit


class RemoteKeySet:
    """The keys behind one ``jwksUri`` (``discovery=False``) or one issuer's OIDC discovery.

    Thread-safe: the fetch thread writes, Checks read :attr:`state` without a lock.
    """

    def __init__(
        self,
        url: str,
        *,
        discovery: bool = False,
        settings: FetchSettings | None = None,
        timeout: float | None = None,
        getter: HttpGet | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.discovery = discovery
        self.settings = settings or FetchSettings()
        self.timeout = timeout if timeout is not None else self.settings.timeout
        self._get = getter or urllib_getter(self.settings)
        self._clock = clock
        self.state = KeyState((), 0)
        self.stats = FetchStats()
        self.last_error = ""
        self.jwks_url = "" if discovery else url
        self._etag = ""
        self._cache_headers: dict[str, str] = {}
        self._digest = b""
        self._cond = threading.Condition()
        self._next_due = 0.0
        self._backoff_until = 0.0
        self._last_refetch = -1e18  # the last early refetch granted
        self._failures_in_row = 0
        self._poked = False
        self._pending: Future[bool] | None = None  # the next fetch's outcome
        self._in_flight: Future[bool] | None = None
        self._first = threading.Event()  # set after the first attempt, good or bad
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def describe(self) -> str:
        return f"OIDC discovery for {self.url}" if self.discovery else self.url

    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name=f"jwks {self.url}", daemon=True)
            self._thread.start()

    def close(self, *, wait: bool = True) -> None:
        """Stop fetching. ``wait=False`` only tells the thread (a fetch in progress ends by
        itself within its timeout): the event loop must never wait for an IdP."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.timeout * 2 + 1)

    def wait_ready(self, timeout: float) -> bool:
        """Wait for the first fetch attempt; True if keys are in hand."""
        self._first.wait(timeout)
        return bool(self.state.keys)

    def request_refresh(self) -> Future[bool] | None:
        """Ask for an early fetch (an unknown kid); None when the rate limit refuses it.

        Concurrent callers share one fetch. The future's result says whether the fetch
        succeeded; it never raises.
        """
        with self._cond:
            if self._closed or self._thread is None:
                return None
            if self._pending is not None:
                return self._pending
            if self._in_flight is not None:
                return self._in_flight
            now = self._clock()
            # Scheduled fetches do not count: a key rotated in just after one is still fetched.
            if (
                now < self._last_refetch + self.settings.min_refetch_interval
                or now < self._backoff_until
            ):
                self.stats.refetches_limited += 1
                return None
            self._last_refetch = now
            self.stats.refetches += 1
            self._pending = Future()
            self._poked = True
            self._cond.notify_all()
            return self._pending

    # --- the fetch thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._poked and self._clock() < self._next_due:
                    self._cond.wait(timeout=max(self._next_due - self._clock(), 0.01))
                if self._closed:
                    break
                early, self._poked = self._poked, False
                self._in_flight, self._pending = self._pending or Future(), None
            ok = False
            try:
                ok = self._fetch(early)
            except Exception:  # a bug must not kill the thread and freeze the keys
                log.exception("JWKS fetch for %s crashed", self.describe)
                self._failed("internal error")
            finally:
                with self._cond:
                    done, self._in_flight = self._in_flight, None
                self._first.set()
                if done is not None:
                    done.set_result(ok)
        with self._cond:
            for waiting in (self._pending, self._in_flight):
                if waiting is not None and not waiting.done():
                    waiting.set_result(False)

    def _fetch(self, early: bool = False) -> bool:
        try:
            if self.discovery and (not self.jwks_url or not early or self.last_error):
                # The document rarely changes: an unknown kid's refetch (which a Check waits
                # for) goes straight to the JWKS, one request instead of two.
                self.jwks_url = self._discover()
            headers = {"If-None-Match": self._etag} if self._etag and self.state.keys else {}
            response = self._get(self.jwks_url, headers, self.timeout)
            if response.status == 304 and self.state.keys:
                self.stats.fetches += 1
                self.stats.not_modified += 1
                # RFC 9111 4.3.4: a 304's cache headers update the stored ones it carries.
                self._cache_headers = {**self._cache_headers, **_freshness(response.headers)}
                self._succeeded()
                return True
            if response.status != 200:
                raise JwksError(f"HTTP {response.status}")
            digest = hashlib.sha256(response.body).digest()
            if digest != self._digest or not self.state.keys:
                text = response.body.decode("utf-8")
                keys = compile_jwks(text, source=self.jwks_url)
                self.state = KeyState(keys, self.state.revision + 1)
                self._digest = digest
                log.info("JWKS %s: %d key(s) loaded", self.jwks_url, len(keys))
            self._etag = response.headers.get("etag", "")
            self._cache_headers = _freshness(response.headers)
            self.stats.fetches += 1
            self._succeeded()
            return True
        except (OSError, ValueError, JwksError) as exc:
            # OSError covers URLError, HTTPError, timeouts, TLS; ValueError bad JSON/UTF-8.
            message = exc.message if isinstance(exc, JwksError) else f"{type(exc).__name__}: {exc}"
            self._failed(message)
            return False

    def _discover(self) -> str:
        url = self.url.rstrip("/") + DISCOVERY_PATH
        response = self._get(url, {}, self.timeout)
        if response.status != 200:
            raise JwksError(f"{url}: HTTP {response.status}")
        try:
            doc = json.loads(response.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise JwksError(f"{url}: not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise JwksError(f"{url}: not a JSON object")
        # OpenID Connect Discovery 1.0 section 4.3: the issuer must be the one asked for.
        if doc.get("issuer") != self.url:
            raise JwksError(f"{url}: issuer {doc.get('issuer')!r} is not {self.url!r}")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise JwksError(f"{url}: jwks_uri missing or not an http(s) URL")
        if self.url.startswith("https://") and not jwks_uri.startswith("https://"):
            raise JwksError(f"{url}: jwks_uri {jwks_uri!r} is not https")
        return jwks_uri

    def _succeeded(self) -> None:
        if self.last_error:
            log.warning("JWKS %s: fetching works again", self.describe)
        self.last_error = ""
        self._failures_in_row = 0
        ttl = _cache_lifetime(self._cache_headers, self.settings.refresh_interval)
        ttl = min(max(ttl, self.settings.min_refetch_interval), self.settings.refresh_interval)
        with self._cond:
            self._backoff_until = 0.0
            self._next_due = self._clock() + ttl

    def _failed(self, message: str) -> None:
        self.stats.failures += 1
        self._failures_in_row += 1
        if message != self.last_error:
            kept = f"keeping {len(self.state.keys)} cached key(s)" if self.state.keys else "no keys"
            log.warning("JWKS %s: fetch failed (%s); %s", self.describe, message, kept)
        self.last_error = message
        delay = min(self.settings.max_backoff, 2.0 ** (self._failures_in_row - 1))
        delay *= _JITTER.uniform(0.8, 1.2)
        with self._cond:
            self._next_due = self._backoff_until = self._clock() + delay


def _freshness(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k in ("cache-control", "expires", "date")}


def _cache_lifetime(headers: Mapping[str, str], default: float) -> float:
    """Seconds the response may be reused: ``Cache-Control`` first, then ``Expires``."""
    control = headers.get("cache-control", "")
    directives = [d.strip().lower() for d in control.split(",") if d.strip()]
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    for d in directives:
        name, _, value = d.partition("=")
        if name == "max-age":
            try:
                return max(float(int(value.strip('"'))), 0.0)
            except ValueError:
                break
    expires = headers.get("expires")
    if expires:
        try:
            when = parsedate_to_datetime(expires).timestamp()
            date = headers.get("date")
            now = parsedate_to_datetime(date).timestamp() if date else time.time()
        except (TypeError, ValueError, IndexError):
            return 0.0  # RFC 9111 5.3: an invalid Expires means already expired
        return max(when - now, 0.0)
    return default


def _offline(url: str, headers: Mapping[str, str], timeout: float) -> HttpResponse:
    raise OSError(f"{url}: not fetched (policies loaded without a server)")


class KeySetRegistry:
    """One :class:`RemoteKeySet` per (URL, discovery, timeout), shared by policy reloads.

    ``live=False`` (``policy lint``, ``policy test``) hands out sets that never fetch: loading
    policies must not touch the network unless a server will use the keys.
    """

    def __init__(
        self,
        settings: FetchSettings | None = None,
        *,
        live: bool = True,
        getter: HttpGet | None = None,
    ) -> None:
        self.settings = settings or FetchSettings()
        self.live = live
        # One opener (and CA bundle read) for every set; none at all when nothing fetches.
        self._getter = getter or (urllib_getter(self.settings) if live else _offline)
        self._sets: dict[tuple[str, bool, float], RemoteKeySet] = {}
        self._lock = threading.Lock()
        self._retired = FetchStats()  # counters of stopped sets: metrics never go down

    def key_set(self, url: str, *, discovery: bool, timeout: float | None = None) -> RemoteKeySet:
        key = (url, discovery, timeout if timeout is not None else self.settings.timeout)
        with self._lock:
            found = self._sets.get(key)
            if found is None:
                found = RemoteKeySet(
                    url,
                    discovery=discovery,
                    settings=self.settings,
                    timeout=key[2],
                    getter=self._getter,
                )
                self._sets[key] = found
                if self.live:
                    found.start()
        return found

    def sets(self) -> list[RemoteKeySet]:
        with self._lock:
            return list(self._sets.values())

    def wait_ready(self, sets: Iterable[RemoteKeySet]) -> list[RemoteKeySet]:
        """Wait (bounded by each set's timeout) for first fetches; the sets still without keys."""
        if not self.live:
            return []
        pending = list(sets)
        deadline = time.monotonic() + max((s.timeout for s in pending), default=0.0) * 2 + 1
        for s in pending:
            s.wait_ready(max(deadline - time.monotonic(), 0.0))
        return [s for s in pending if not s.state.keys]

    def retain(self, used: Iterable[RemoteKeySet], *, wait: bool = False) -> None:
        """Stop the sets no loaded policy refers to any more. Does not wait for them (it runs
        on the event loop after a reload) unless ``wait``."""
        keep = {id(s) for s in used}
        with self._lock:
            gone = [(k, s) for k, s in self._sets.items() if id(s) not in keep]
            for k, s in gone:
                del self._sets[k]
                _add(self._retired, s.stats)
        for _, s in gone:
            s.close(wait=wait)

    def close(self) -> None:
        """Stop every set and wait for the threads (at shutdown)."""
        self.retain((), wait=True)

    def totals(self) -> FetchStats:
        """Counters of every set this registry ever had, stopped ones included."""
        with self._lock:
            total = FetchStats()
            _add(total, self._retired)
            for s in self._sets.values():
                _add(total, s.stats)
        return total


def _add(into: FetchStats, more: FetchStats) -> None:
    into.fetches += more.fetches
    into.failures += more.failures
    into.not_modified += more.not_modified
    into.refetches += more.refetches
    into.refetches_limited += more.refetches_limited
