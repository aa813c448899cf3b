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
from .identity.jwks import KeySetRegistry
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
        keys: KeySetRegistry | None = None,
    ) -> None:
        self.authorizer = authorizer
        self.directory = directory
        self.root_namespace = root_namespace
        # Remote JWKS shared with the set in force: a reload reuses fetched keys.
        self.keys = keys
        self.interval = interval
        self.load = PolicySet.load  # a seam for tests
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
            current = self.authorizer.policies
            seen = await asyncio.to_thread(fingerprint, self.directory, current.source.dependencies)
            if not force and seen == self._seen:
                return self.status
            # Read on the event loop: Checks add workloads to this dict.
            keys = current.workload_keys()
            try:
                loaded, self._seen = await asyncio.to_thread(self._load, current, keys)
            except (PolicySetError, PolicyError) as exc:
                self._seen = seen
                errors = tuple(
                    e.message for e in (exc.errors if isinstance(exc, PolicySetError) else [exc])
                )
                if isinstance(exc, _Unsettled):
                    self._seen = ()  # try again at the next poll
                for message in errors:
                    log.error(
                        "policy reload failed, keeping revision %s: %s",
                        self.status.revision,
                        message,
                    )
                return await self._failed(errors)
            except Exception:  # a bug in loading must not kill the watcher
                log.exception("policy reload crashed; keeping revision %s", self.status.revision)
                self._seen = seen
                return await self._failed(("internal error while loading; see the log",))
            old = current.revision
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

    async def _failed(self, errors: tuple[str, ...]) -> ReloadStatus:
        s = self.status
        await self._publish(
            ReloadStatus(s.revision, False, errors, s.loaded_at, s.reloads, s.failures + 1)
        )
        return self.status

    def _load(
        self,
        current: PolicySet,
        keys: list[tuple[str | None, str | None, frozenset[Target]]],
    ) -> tuple[PolicySet, Fingerprint]:
        """Load a set whose files did not change while they were read, and check it."""
        for _ in range(_ATTEMPTS):
            before = fingerprint(self.directory, current.source.dependencies)
            loaded = self.load(self.directory, root_namespace=self.root_namespace, keys=self.keys)
            # A file rewritten, or a ConfigMap's ..data swapped, between two reads would
            # give a set mixing two versions (a DENY moved between files could vanish).
            if fingerprint(self.directory, current.source.dependencies) == before:
                break
            time.sleep(_SETTLE_SECONDS)
        else:
            raise _Unsettled(f"{self.directory}: files kept changing while being read; will retry")
        _refuse_vanished_resources(current, loaded)
        # Select and index the policies of every workload already served, so that no
        # request after the swap pays for it (0.5 s at 10,000 rules).
        loaded.warm(keys)
        return loaded, fingerprint(self.directory, loaded.source.dependencies)

    async def _publish(self, status: ReloadStatus) -> None:
        if self.keys is not None:
            # After every attempt: a failed load may have started fetches nobody will read.
            self.keys.retain(self.authorizer.policies.key_sets)
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


_ATTEMPTS = 3
_SETTLE_SECONDS = 0.2


class _Unsettled(PolicyError):
    """The policy files changed while a reload read them."""


def _refuse_vanished_resources(current: PolicySet, loaded: PolicySet) -> None:
    """No policy at all means "allow everything", and a file that lost every resource may
    have held the DENY that mattered: both are far likelier a file caught mid-write or a
    directory mid-copy than an intent, so a reload never installs them. Deleting the file
    (or restarting) is the explicit way."""
    if not (loaded.authz or loaded.authn) and (current.authz or current.authn):
        raise PolicyError(
            f"the new set holds no policies at all; keeping revision {current.revision} "
            "(restart without --policies to run with none)"
        )
    had = {p.file for p in current.authz} | {r.file for r in current.authn}
    has = {p.file for p in loaded.authz} | {r.file for r in loaded.authn}
    for file in sorted(had & set(loaded.source.files) - has):
        raise PolicyError(
            "no longer holds any policy; keeping the loaded set (delete the file to "
            "remove its policies)",
            file=file,
        )
