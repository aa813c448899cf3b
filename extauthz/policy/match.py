"""Compiled value matchers: Istio's string forms and IP blocks.

A list of Istio values (``exact``, ``prefix*``, ``*suffix``, ``*``) compiles into one
:class:`StringMatcher` that tests all of them with a set lookup and two tuple-argument
``startswith``/``endswith`` calls, so matching cost does not grow with the list in Python code.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BadValue(ValueError):
    """A policy value that cannot be compiled; the caller adds file:line and field."""


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """OR of Istio string forms. ``*`` means present and non-empty."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    presence: bool = False
    fold_case: bool = False
    star_matches_empty: bool = False

    def __call__(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.fold_case:
            value = value.lower()
        if value in self.exact:
            return True
        if not value:
            return self.presence and self.star_matches_empty
        return (
            self.presence
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.endswith(self.suffixes))
        )

    def function(self) -> Callable[[str | None], bool]:
        """This matcher as the cheapest equivalent function: the common forms (exact values
        and prefixes, case-sensitive, no ``*``) as one closure, the rest as ``__call__``."""
        if self.presence or self.fold_case or self.suffixes:
            return self
        exact, prefixes = self.exact, self.prefixes
        if not prefixes:
            # None and "" need no test: the set holds strings, "" only if a value was "".
            return exact.__contains__
        if not exact:
            # Prefixes are never empty ("*" is presence), so "" cannot match one.
            return lambda value: value is not None and value.startswith(prefixes)
        return lambda value: value is not None and (value in exact or value.startswith(prefixes))


def compile_strings(
    values: Sequence[str], *, fold_case: bool = False, star_matches_empty: bool = False
) -> StringMatcher:
    """Compile Istio string values; a ``*`` anywhere but the very start or end is refused.

    ``star_matches_empty``: for hosts, methods and headers Istio's ``*`` only asks that the
    header exist; everywhere else it asks for a non-empty value.
    """
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    presence = False
    for raw in values:
        v = raw.lower() if fold_case else raw
        if v == "*":
            presence = True
        elif v.startswith("*") and "*" not in v[1:]:
            suffixes.append(v[1:])
        elif v.endswith("*") and "*" not in v[:-1]:
            prefixes.append(v[:-1])
        elif "*" in v:
            raise BadValue(
                f"{raw!r}: '*' is only allowed alone, as a prefix ('*abc') or as a suffix ('abc*')"
            )
        else:
            exact.add(v)
    return StringMatcher(
        frozenset(exact), tuple(prefixes), tuple(suffixes), presence, fold_case, star_matches_empty
    )


@dataclass(frozen=True, slots=True)
class PrincipalRegexMatcher:
    """Istio's namespace / service-account matching: a regex over the whole peer principal.

    Istio matches ``namespaces`` as ``.*/ns/<ns>/.*`` and ``serviceAccounts`` as
    ``.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?`` against the principal, so any occurrence counts; a
    narrower reading would let ``td/ns/good/sa/x/ns/evil/y`` past a DENY on ``evil``.
    """

    pattern: re.Pattern[str]

    def __call__(self, principal: str | None) -> bool:
        return principal is not None and self.pattern.fullmatch(principal) is not None


def _glob(value: str) -> str:
    """A namespace value as Istio compiles it: each ``*`` becomes ``.*``, which may span
    segments (so ``*a`` also matches ``.../ns/ns1/sa/...``). Narrower would let a DENY that
    Istio applies miss."""
    return ".*".join(map(re.escape, value.split("*")))


def compile_namespaces(values: Sequence[str]) -> PrincipalRegexMatcher:
    alternatives = "|".join(f"(?:{_glob(v)})" for v in values)
    return PrincipalRegexMatcher(re.compile(f".*/ns/(?:{alternatives})/.*"))


def compile_service_accounts(accounts: Sequence[str]) -> PrincipalRegexMatcher:
    """``accounts`` as ``<ns>/<sa>``, already resolved against the policy's namespace."""
    alternatives = []
    for account in accounts:
        ns, sa = account.split("/")
        alternatives.append(f"(?:.+/ns/{re.escape(ns)}/(?:.+/|)sa/{re.escape(sa)}(?:/.+)?)")
    return PrincipalRegexMatcher(re.compile("|".join(alternatives)))


@dataclass(frozen=True, slots=True)
class RequestPrincipalMatcher:
    """``iss/sub`` values split at the last ``/``; issuer and subject matched separately.

    ``*`` asks for a token with non-empty ``iss`` and ``sub``; a value without ``/`` is matched
    against the whole ``iss/sub`` string.
    """

    parts: tuple[tuple[StringMatcher, StringMatcher], ...]
    whole: StringMatcher | None
    any_principal: bool

    def function(self) -> Callable[[tuple[str, str] | None], bool]:
        """The usual form (one ``iss/sub`` value) as one closure; the rest as ``__call__``."""
        if self.whole is not None or self.any_principal or len(self.parts) != 1:
            return self
        issuer, subject = (m.function() for m in self.parts[0])
        return lambda p: p is not None and issuer(p[0]) and subject(p[1])

    def __call__(self, principal: tuple[str, str] | None) -> bool:
        if principal is None:
            return False
        iss, sub = principal
        if self.any_principal and iss and sub:
            return True
        if any(mi(iss) and ms(sub) for mi, ms in self.parts):
            return True
        # Istio also asks for a non-empty issuer and subject here.
        return self.whole is not None and bool(iss and sub) and self.whole(f"{iss}/{sub}")


def compile_request_principals(values: Sequence[str]) -> RequestPrincipalMatcher:
    parts: list[tuple[StringMatcher, StringMatcher]] = []
    whole: list[str] = []
    for v in values:
        if v == "*":
            continue
        stars = v.count("*")
        if stars > 1 or (stars == 1 and not (v.startswith("*") or v.endswith("*"))):
            # Istio matches the whole "iss/sub" with one leading or trailing '*' and reads any
            # other '*' literally ("*/*" is a subject of "*"): refuse rather than guess wider.
            raise BadValue(
                f"{v!r}: a request principal takes one '*', at its start or end "
                "(write '*' for any token, 'iss/*' for any subject of an issuer)"
            )
        iss, slash, sub = v.rpartition("/")
        if slash:
            parts.append((compile_strings([iss]), compile_strings([sub])))
        else:
            whole.append(v)
    return RequestPrincipalMatcher(
        tuple(parts), compile_strings(whole) if whole else None, "*" in values
    )


@dataclass(frozen=True, slots=True)
class IPMatcher:
    """OR of CIDR blocks (a bare address is a /32 or /128)."""

    networks: tuple[IPNetwork, ...]

    def __call__(self, address: IPAddress | None) -> bool:
        if address is None:
            return False
        return any(address in net for net in self.networks)


def compile_ip_blocks(values: Sequence[str]) -> IPMatcher:
    nets: list[IPNetwork] = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError as exc:
            raise BadValue(f"{v!r} is not an IP address or CIDR block") from exc
    return IPMatcher(tuple(nets))


_MAX_IP_TEXT = 45  # the longest textual IPv6 address (with an embedded IPv4)


def parse_ip(value: str) -> IPAddress | None:
    """An address from Envoy (or XFF); None when absent or not an IP (e.g. a Unix socket)."""
    value = value.strip()
    # XFF entries are caller-chosen: never let them grow the cache beyond address size.
    return _parse_ip(value) if len(value) <= _MAX_IP_TEXT else None


@lru_cache(maxsize=4096)
def _parse_ip(value: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


_TEMPLATE_SEGMENT = re.compile(r"\{(\*\*?)\}")


def is_path_template(value: str) -> bool:
    return "{" in value or "}" in value


@dataclass(frozen=True, slots=True)
class PathTemplateMatcher:
    """Istio path templates: ``{*}`` is exactly one segment, ``{**}`` zero or more (last only)."""

    patterns: tuple[re.Pattern[str], ...]

    def __call__(self, path: str | None) -> bool:
        if path is None:
            return False
        return any(p.fullmatch(path) for p in self.patterns)


def compile_path_templates(values: Sequence[str]) -> PathTemplateMatcher:
    return PathTemplateMatcher(tuple(_compile_template(v) for v in values))


def _compile_template(value: str) -> re.Pattern[str]:
    if not value.startswith("/"):
        raise BadValue(f"{value!r}: a path template must start with '/'")
    segments = value.split("/")[1:]
    out: list[str] = []
    for i, seg in enumerate(segments):
        m = _TEMPLATE_SEGMENT.fullmatch(seg)
        if m is None:
            if "{" in seg or "}" in seg or "*" in seg:
                raise BadValue(
                    f"{value!r}: '{{*}}' and '{{**}}' must each be a whole path segment, "
                    "and a template cannot also use '*'"
                )
            out.append(re.escape(seg))
        elif m.group(1) == "*":
            out.append("[^/]+")
        else:
            if i != len(segments) - 1:
                raise BadValue(f"{value!r}: nothing may follow '{{**}}'")
            out.append(".*")  # zero or more segments
    return re.compile("/" + "/".join(out))
