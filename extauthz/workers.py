"""``extauthz serve --workers N``: N server processes under a supervisor.

One Python process decides on about one core (the GIL), so a host with more cores runs
several. Each worker listens on an address of its own rather than sharing one with
SO_REUSEPORT: the kernel spreads *connections*, and Envoy multiplexes every check over a
few HTTP/2 connections, so one worker would get most of the load. Envoy instead sees N
endpoints and balances requests across them (``envoy/workers.yaml``).

Worker ``i`` (0..N-1) listens on ``--listen``'s port + i, or on ``unix:/run/x-i.sock`` for
``unix:/run/x.sock``; ``--metrics-listen``, ``--admin-listen`` and ``--http-listen`` are
numbered the same way, ``--decision-log PATH`` becomes one file per worker
(``decisions-i.jsonl``), and only worker 0 serves ``--jwks-listen`` (every worker signs with
the same key). Each worker loads, polls and reloads the policies itself.

The supervisor forwards SIGTERM/SIGINT (each worker drains as one process would) and SIGHUP
(reload), restarts a worker that dies with a doubling backoff, and exits non-zero when a
worker cannot start: at startup, or five times in a row later.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from .config import Settings, host_port
from .decisionlog.settings import STDOUT
from .errors import ConfigError

log = logging.getLogger(__name__)

READY = b"R"  # what a worker writes to its ready pipe once it serves
START_TIMEOUT = 60.0  # policies with remote JWKS may take a while to load
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 10.0
STABLE_AFTER = 30.0  # a worker up this long resets its backoff
MAX_FAILED_STARTS = 5  # consecutive restarts that die before serving: give up
_PR_SET_PDEATHSIG = 1


def numbered(listen: str, index: int, flag: str) -> str:
    """Worker ``index``'s address for ``flag``'s ``listen``: port + index, or ``x-index.sock``."""
    if listen.startswith("unix:"):
        path = PurePosixPath(listen.removeprefix("unix:"))
        if not path.name:
            raise ConfigError(f"{flag} {listen!r}: expected unix:/path")
        return f"unix:{path.with_name(f'{path.stem}-{index}{path.suffix}')}"
    _host, port = host_port(listen, flag)
    if port == 0:
        raise ConfigError(
            f"{flag} {listen}: --workers needs a fixed port (worker i listens on port + i, "
            "the addresses Envoy is configured with)"
        )
    if port + index > 65535:
        raise ConfigError(f"{flag} {listen}: worker {index} would need port {port + index}")
    return f"{listen.rpartition(':')[0]}:{port + index}"


def numbered_file(path: str, index: int) -> str:
    """``decisions.jsonl`` → ``decisions-<index>.jsonl``: one writer (and rotation) per file."""
    p = PurePosixPath(path)
    return str(p.with_name(f"{p.stem}-{index}{p.suffix}"))


def for_worker(settings: Settings, index: int, workers: int) -> Settings:
    """The settings worker ``index`` of ``workers`` runs with (see the module docstring)."""
    if not 0 <= index < workers:
        raise ConfigError(f"--worker-index {index}: expected 0..{workers - 1}")
    log_settings = settings.decision_log
    if log_settings is not None:
        if log_settings.path == STDOUT:
            raise ConfigError(
                "--decision-log -: with --workers, each worker writes its own file "
                "(PATH-i); give a PATH"
            )
        log_settings = dataclasses.replace(
            log_settings, path=numbered_file(log_settings.path, index)
        )
    return dataclasses.replace(
        settings,
        listen=numbered(settings.listen, index, "--listen"),
        metrics_listen=_maybe(settings.metrics_listen, index, "--metrics-listen"),
        admin_listen=_maybe(settings.admin_listen, index, "--admin-listen"),
        http_listen=_maybe(settings.http_listen, index, "--http-listen"),
        jwks_listen=settings.jwks_listen if index == 0 else None,
        decision_log=log_settings,
    )


def _maybe(listen: str | None, index: int, flag: str) -> str | None:
    return None if listen is None else numbered(listen, index, flag)


def check_plan(
    settings: Settings, workers: int, env: Mapping[str, str] | None = None
) -> list[Settings]:
    """Every worker's settings; ConfigError if two listeners of the plan (the Prometheus
    port of ``env`` included) share an address."""
    plans = [for_worker(settings, i, workers) for i in range(workers)]
    base = dict(os.environ if env is None else env)
    owners: dict[str, str] = {}
    for i, plan in enumerate(plans):
        prometheus = _prometheus_port(child_env(i, base))
        for flag, address in (
            ("--listen", plan.listen),
            ("--metrics-listen", plan.metrics_listen),
            ("--admin-listen", plan.admin_listen),
            ("--http-listen", plan.http_listen),
            ("--jwks-listen", plan.jwks_listen),
            (
                "OTEL_EXPORTER_PROMETHEUS_PORT",
                None if prometheus is None else f"0.0.0.0:{prometheus}",
            ),
        ):
            if address is None:
                continue
            key = _address_key(address)
            if key in owners:
                raise ConfigError(
                    f"{flag} of worker {i} is {address}, which {owners[key]} already uses: "
                    f"with --workers {workers} each flag takes {workers} consecutive ports"
                )
            owners[key] = f"{flag} of worker {i}"
    return plans


def _address_key(address: str) -> str:
    if address.startswith("unix:"):
        return address
    _host, port = host_port(address, "address")
    return f"port {port}"  # 0.0.0.0:9192 and 127.0.0.1:9192 collide too


def child_env(index: int, base: dict[str, str]) -> dict[str, str]:
    """A worker's environment: its metrics carry ``extauthz.worker`` so that N cumulative
    series from one host stay apart, and an env-configured Prometheus port is numbered."""
    env = dict(base)
    attrs = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    env["OTEL_RESOURCE_ATTRIBUTES"] = f"{attrs},extauthz.worker={index}".lstrip(",")
    port = _prometheus_port(env)
    if port is not None:
        env["OTEL_EXPORTER_PROMETHEUS_PORT"] = str(port + index)
    return env


def _prometheus_port(env: Mapping[str, str]) -> int | None:
    """The port an env-configured Prometheus exporter listens on, None without one."""
    if "OTEL_EXPORTER_PROMETHEUS_PORT" not in env and "prometheus" not in env.get(
        "OTEL_METRICS_EXPORTER", ""
    ):
        return None
    text = env.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ConfigError(f"OTEL_EXPORTER_PROMETHEUS_PORT={text!r}: expected a port number")
    return int(text)


# Held pending in a new worker until its event loop handles them (server.run unblocks
# them): a SIGTERM or SIGHUP forwarded while it starts would otherwise kill it outright.
STARTUP_BLOCKED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def _prepare_worker() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_BLOCKED)
    # A worker must not outlive a supervisor killed with SIGKILL (Linux only; elsewhere
    # the ready pipe's EOF is all a worker could notice, and it does not look).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Worker:
    index: int
    listen: str
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    ready: bool = False
    started: float = 0.0
    backoff: float = FIRST_BACKOFF
    failed_starts: int = 0
    restart_at: float | None = None


@dataclass
class Supervisor:
    """Starts ``len(listens)`` workers with ``command(index, ready_fd)`` and keeps them up."""

    listens: Sequence[str]
    command: Callable[[int, int], list[str]]
    grace: float = 5.0  # a worker's own drain budget (--grace + --drain-delay)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    _workers: list[_Worker] = field(default_factory=list)
    _stop: int | None = None
    _reload: bool = False

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status (0: every worker stopped cleanly)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        self._workers = [_Worker(i, listen) for i, listen in enumerate(self.listens)]
        try:
            for w in self._workers:
                self._spawn(w)
            if not self._wait_started():
                return 1
            if self._stop is None:
                log.info("%d workers serving: %s", len(self._workers), ", ".join(self.listens))
            return self._supervise()
        finally:
            self._stop_all()

    def _on_stop(self, signum: int, _frame: object) -> None:
        self._stop = signum

    def _on_hup(self, _signum: int, _frame: object) -> None:
        self._reload = True

    def _spawn(self, w: _Worker) -> None:
        read_fd, write_fd = os.pipe()
        try:
            w.proc = subprocess.Popen(
                self.command(w.index, write_fd),
                pass_fds=(write_fd,),
                env=child_env(w.index, self.env),
                # preexec_fn is unsafe with threads; the supervisor runs none.
                preexec_fn=_prepare_worker,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        w.ready_fd, w.ready, w.started, w.restart_at = read_fd, False, time.monotonic(), None
        log.info("worker %d (pid %d) starting on %s", w.index, w.proc.pid, w.listen)

    def _wait_started(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w.ready for w in self._workers):
            if self._stop is not None:
                return True  # stopping before serving is not a failure
            self._poll_ready(0.2)
            for w in self._workers:
                if w.proc is not None and w.proc.poll() is not None and not w.ready:
                    log.error(
                        "worker %d on %s exited with status %s before serving: stopping",
                        w.index,
                        w.listen,
                        w.proc.returncode,
                    )
                    return False
            if time.monotonic() > deadline:
                log.error("workers not serving after %.0f s: stopping", START_TIMEOUT)
                return False
        return True

    def _poll_ready(self, timeout: float) -> None:
        fds = {w.ready_fd: w for w in self._workers if w.ready_fd is not None}
        if not fds:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(list(fds), [], [], timeout)
        for fd in readable:
            w = fds[fd]
            data = os.read(fd, 1)
            if data == READY:
                w.ready = True
            os.close(fd)  # EOF (the worker died) or the one byte it ever writes
            w.ready_fd = None

    def _supervise(self) -> int:
        while self._stop is None:
            if self._reload:
                self._reload = False
                self._signal_all(signal.SIGHUP)
            self._poll_ready(0.2)
            now = time.monotonic()
            for w in self._workers:
                if w.restart_at is not None:
                    if now >= w.restart_at and self._stop is None:
                        self._spawn(w)
                    continue
                assert w.proc is not None
                if w.proc.poll() is None:
                    if w.ready and now - w.started > STABLE_AFTER:
                        w.backoff, w.failed_starts = FIRST_BACKOFF, 0
                    continue
                if self._stop is not None:
                    break
                if not w.ready:
                    w.failed_starts += 1
                    if w.failed_starts >= MAX_FAILED_STARTS:
                        log.error(
                            "worker %d on %s failed to start %d times in a row: stopping",
                            w.index,
                            w.listen,
                            w.failed_starts,
                        )
                        return 1
                log.error(
                    "worker %d (pid %d) exited with status %s: restarting in %.1f s",
                    w.index,
                    w.proc.pid,
                    w.proc.returncode,
                    w.backoff,
                )
                w.restart_at = now + w.backoff
                w.backoff = min(w.backoff * 2, MAX_BACKOFF)
        log.info("signal %d: stopping %d workers", self._stop, len(self._workers))
        return self._stop_all()

    def _signal_all(self, sig: int) -> None:
        for w in self._workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def _stop_all(self) -> int:
        """SIGTERM every worker, wait for their drain, SIGKILL stragglers; 0 if all exit 0."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + 10.0
        status = 0
        for w in self._workers:
            if w.ready_fd is not None:
                os.close(w.ready_fd)
                w.ready_fd = None
            if w.proc is None or w.restart_at is not None:
                continue
            try:
                code = w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time: killing it", w.index)
                w.proc.kill()
                code = w.proc.wait()
            if code != 0:
                log.error("worker %d exited with status %s", w.index, code)
                status = 1
            w.proc = None
        return status
