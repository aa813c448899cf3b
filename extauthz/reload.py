"""Hot reload: watch the policy directory (and the JWKS files it names), recompile off the
request path, swap the compiled set atomically.

A poll of file metadata every ``interval`` seconds (no inotify dependency, works on every
volume type, including Kubernetes ConfigMap symlink swaps), plus SIGHUP for an immediate
reload. A set that fails to load is reported with every ``file:line`` and the last good set
stays in force; the health service ``extauthz.policy`` turns NOT_SERVING until a good set
loads, while Check itself keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from .authorizer import Authorizer
from .errors import PolicyError, PolicySetError
from .policy.engine import PolicySet
from .policy.model import Target
from .policy.source import policy_files

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class ReloadStatus:
    """The reloader's state, for health, the admin service and metrics."""

    revision: str
    ok: bool
    errors: tuple[str, ...] = ()
    loaded_at: float = 0.0
    reloads: int = 0
    failures: int = 0


def fingerprint(directory: Path, dependencies: tuple[str, ...]) -> Fingerprint:
    """What changes when a policy or JWKS file is added, removed, edited or replaced."""
    entries: list[tuple[str, int, int, int]] = []
    try:
        paths = [*policy_files(directory), *map(Path, dependencies)]
    except PolicyError:
        return (("<missing>", 0, 0, 0),)
    for path in paths:
        try:
            st = path.stat()  # follows symlinks: a ConfigMap's ..data swap changes the inode
        except OSError:
            entries.append((str(path), -1, -1, -1))
            continue
        entries.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(entries)


class PolicyReloader:
    """Keeps ``authorizer`` on the newest policy set that loads."""

    def __init__(
        self,
        authorizer: Authorizer,
        directory: Path,
        *,
        root_namespace: str,
        interval: float = 2.0,
    ) -> None:
        self.authorizer = authorizer
        self.directory = directory
        self.root_namespace = root_namespace
        self.interval = interval
        # Called after every reload attempt, right after the swap (no await in between).
        self.listeners: list[Callable[[ReloadStatus], Awaitable[None]]] = []
        current = authorizer.policies
        self.status = ReloadStatus(current.revision, True, loaded_at=time.time())
        self._seen = fingerprint(directory, current.source.dependencies)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._forced = False

    def request(self) -> None:
        """Reload now, even if no file looks changed (SIGHUP)."""
        self._forced = True
        self._wake.set()

    async def reload(self, *, force: bool = False) -> ReloadStatus:
        """Reload if something changed (or ``force``); never raises for a bad policy set."""
        async with self._lock:
            deps = self.authorizer.policies.source.dependencies
            seen = await asyncio.to_thread(fingerprint, self.directory, deps)
            if not force and seen == self._seen:
                return self.status
            self._seen = seen
            # Read on the event loop: Checks add workloads to this dict.
            keys = self.authorizer.policies.workload_keys()
            try:
                loaded = await asyncio.to_thread(self._load, keys)
            except (PolicySetError, PolicyError) as exc:
                errors = tuple(
                    e.message for e in (exc.errors if isinstance(exc, PolicySetError) else [exc])
                )
                for message in errors:
                    log.error(
                        "policy reload failed, keeping revision %s: %s",
                        self.status.revision,
                        message,
                    )
                await self._publish(
                    ReloadStatus(
                        self.status.revision,
                        False,
                        errors,
                        self.status.loaded_at,
                        self.status.reloads,
                        self.status.failures + 1,
                    )
                )
                return self.status
            except Exception:  # a bug in loading must not kill the watcher
                log.exception("policy reload crashed; keeping revision %s", self.status.revision)
                await self._publish(
                    ReloadStatus(
                        self.status.revision,
                        False,
                        ("internal error while loading; see the log",),
                        self.status.loaded_at,
                        self.status.reloads,
                        self.status.failures + 1,
                    )
                )
                return self.status
            # The new set may name other JWKS files: watch those from now on.
            if loaded.source.dependencies != deps:
                self._seen = await asyncio.to_thread(
                    fingerprint, self.directory, loaded.source.dependencies
                )
            old = self.authorizer.policies.revision
            self.authorizer.swap(loaded)
            if loaded.revision != old:
                log.info(
                    "policies reloaded: revision %s -> %s (%d files)",
                    old,
                    loaded.revision,
                    len(loaded.source.files),
                )
            await self._publish(
                ReloadStatus(
                    loaded.revision,
                    True,
                    (),
                    time.time(),
                    self.status.reloads + 1,
                    self.status.failures,
                )
            )
            return self.status

    def _load(self, keys: list[tuple[str | None, str | None, frozenset[Target]]]) -> PolicySet:
        loaded = PolicySet.load(self.directory, root_namespace=self.root_namespace)
        if not loaded.source.files and self.authorizer.policies.source.files:
            # No policy at all means "allow everything": far more likely a directory caught
            # mid-copy than an intent, so it never replaces a loaded set by reload.
            raise PolicyError(
                f"{self.directory} holds no policy files; keeping the loaded set "
                "(restart without --policies to run with none)"
            )
        # Select and index the policies of every workload already served, so that no
        # request after the swap pays for it (0.5 s at 10,000 rules).
        loaded.warm(keys)
        return loaded

    async def _publish(self, status: ReloadStatus) -> None:
        self.status = status
        for listener in self.listeners:
            await listener(status)

    async def run(self) -> None:
        """Poll until cancelled; a SIGHUP (``request``) cuts the wait short."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval or None)
            self._wake.clear()
            force, self._forced = self._forced, False
            try:
                await self.reload(force=force)
            except Exception:
                log.exception("policy watcher failed; retrying in %.1fs", self.interval)
