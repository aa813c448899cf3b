"""A compile-time index over one workload's rules: which rules *could* match a request.

Evaluating every rule of every policy costs time linear in the policy set. This index is built
once per workload (when its policies are first selected) and, per request, returns the few
rules that are not already ruled out by the request's peer principal, ``:authority``, method
or path, found with dict lookups. The engine then runs the full :meth:`Rule.matches` on those
candidates, in policy/rule order: the index only prunes, it never decides.

A rule is left out of a lookup only when the index *proves* it cannot match: it is filed
under one dimension (principal, host, method or path) for which it needs the request value
to be one of a set of exact values, prefixes or suffixes, e.g.

- every entry of its ``from`` list (entries are OR'ed) has a positive ``principals`` field,
  or one of its ``when`` conditions (AND'ed) is a positive ``source.principal``;
- every entry of its ``to`` list has a positive ``hosts`` / ``methods`` / ``paths`` field.

``*`` (presence), ``not`` forms and any other field leave the rule unfiled on that dimension;
a rule filed nowhere is a candidate for every request. A path template (``/api/{*}/items``)
is filed under its literal prefix up to the first ``{``, which every match starts with.

The values are classified by :func:`compile_strings` itself, and the request values read
below are the ones :data:`extauthz.policy.compile._FIELDS` tests (hosts folded to lower case,
everything else case-sensitive, the ``:authority`` port not stripped); the equivalence tests
in ``tests/test_policy_index.py`` hold the two together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .match import compile_strings, is_path_template
from .model import Attributes, AuthorizationPolicy, Clause, Rule

# Below this many rules, scan. Measured (CPython 3.11): from 2 rules on the index is as fast as
# the scan when it prunes nothing (every rule a candidate: +1-2 µs of lookups against 2-5 µs
# per rule matched) and faster as soon as it prunes one rule; one rule is never worth it.
LINEAR_BELOW = 2

Entry = tuple[AuthorizationPolicy, Rule]
Bucket = tuple[int, ...]  # sequence numbers of entries, ascending


@dataclass(frozen=True, slots=True)
class _Dimension:
    """A request attribute rules are filed under, and the policy fields that constrain it."""

    name: str
    get: Callable[[Attributes], str | None]
    fold_case: bool
    on_sources: bool  # a ``from`` field (else a ``to`` field)
    field: str
    when_keys: tuple[str, ...] = ()
    templates: bool = False


def _principal(a: Attributes) -> str | None:
    return a.principal


def _host(a: Attributes) -> str | None:
    return a.inp.host


def _method(a: Attributes) -> str | None:
    return a.inp.method


def _path(a: Attributes) -> str | None:
    return a.inp.path


# Order is the tie-break when a rule could be filed under several dimensions with equal cost.
_DIMENSIONS = (
    _Dimension("principal", _principal, False, True, "principals", ("source.principal",)),
    _Dimension("path", _path, False, False, "paths", templates=True),
    _Dimension("host", _host, True, False, "hosts"),
    _Dimension("method", _method, False, False, "methods"),
)


# What a request value must be for a rule to match: one of these (kind, key) pairs, kind "="
# (exact), "^" (prefix) or "$" (suffix).
_Keys = frozenset[tuple[str, str]]


def _keys_of(dim: _Dimension, values: Sequence[str]) -> _Keys | None:
    """The keys of one positive field's values; None if a value is not indexable."""
    strings: list[str] = []
    keys: set[tuple[str, str]] = set()
    for v in values:
        if dim.templates and is_path_template(v):
            brace = v.find("{")
            if brace < 1:  # the compiler refuses these; never guess
                return None
            keys.add(("^", v[:brace]))
        else:
            strings.append(v)
    m = compile_strings(strings, fold_case=dim.fold_case)
    if m.presence:
        return None
    keys.update(("=", k) for k in m.exact)
    keys.update(("^", k) for k in m.prefixes)
    keys.update(("$", k) for k in m.suffixes)
    return frozenset(keys)


def _clause_keys(dim: _Dimension, clause: Clause, fields: Iterable[str]) -> _Keys | None:
    """Keys from the first positive, indexable check on ``fields`` (checks are AND'ed)."""
    for check in clause.checks:
        if check.field in fields and not check.negated:
            keys = _keys_of(dim, check.values)
            if keys is not None:
                return keys
    return None


def _rule_keys(dim: _Dimension, rule: Rule) -> _Keys | None:
    """Keys every match of ``rule`` needs on ``dim``, or None if it has no such constraint."""
    best: _Keys | None = None
    entries = rule.sources if dim.on_sources else rule.operations
    if entries:
        union: set[tuple[str, str]] = set()
        for clause in entries:  # OR'ed: every entry must constrain the dimension
            keys = _clause_keys(dim, clause, (dim.field,))
            if keys is None:
                break
            union |= keys
        else:
            best = frozenset(union)
    if dim.when_keys:  # AND'ed with the rest: any one condition is needed
        keys = _clause_keys(dim, rule.conditions, dim.when_keys)
        if keys is not None and (best is None or len(keys) < len(best)):
            best = keys
    return best


# A prefix (or suffix) table as a trie whose edges are as long as the shortest key below them:
# a node is (length, {key[:length]: (bucket of keys of exactly that length, child)}), so a
# lookup probes one slice per level and stops at the first miss, however many keys there are.
_Node = tuple[int, dict[str, tuple[Bucket, "_Node | None"]]]


def _trie(keys: dict[str, Bucket], cut: Callable[[str, int], str]) -> _Node | None:
    if not keys:
        return None
    root: _Node = (min(map(len, keys)), {})
    work = [(root, keys)]
    while work:  # not recursive: a policy may nest prefixes a thousand deep
        (length, children), below = work.pop()
        groups: dict[str, dict[str, Bucket]] = {}
        for key, bucket in below.items():
            groups.setdefault(cut(key, length), {})[key] = bucket
        for edge, group in groups.items():
            here = group.pop(edge, ())  # the key that is the edge itself, if any
            child: _Node | None = (min(map(len, group)), {}) if group else None
            children[edge] = (here, child)
            if child is not None:
                work.append((child, group))
    return root


def _head(key: str, length: int) -> str:
    return key[:length]


def _tail(key: str, length: int) -> str:
    return key[-length:]


@dataclass(frozen=True, slots=True)
class _Table:
    """One dimension's buckets: exact values, and tries of prefixes and suffixes."""

    get: Callable[[Attributes], str | None]
    fold_case: bool
    exact: dict[str, Bucket]
    prefixes: _Node | None
    suffixes: _Node | None


def _table(dim: _Dimension, filed: dict[tuple[str, str], list[int]]) -> _Table:
    by_kind: dict[str, dict[str, Bucket]] = {"=": {}, "^": {}, "$": {}}
    for (kind, key), seqs in filed.items():
        by_kind[kind][key] = tuple(sorted(set(seqs)))
    return _Table(
        dim.get,
        dim.fold_case,
        by_kind["="],
        _trie(by_kind["^"], _head),
        _trie(by_kind["$"], _tail),
    )


@dataclass(frozen=True, slots=True)
class IndexStats:
    """How the rules were filed: for benchmarks, tests and the curious."""

    rules: int
    filed: dict[str, int]  # dimension name -> rules filed under it
    unfiled: int  # candidates for every request


class RuleIndex:
    """The rules of ordered groups of policies (e.g. DENY, ALLOW, AUDIT), numbered in order.

    ``entries[seq]`` is ``(policy, rule)``; sequence numbers follow group order, then policy
    order, then rule order, so the first matching candidate is the first matching rule.
    ``ends[g]`` is one past the last sequence number of group ``g``.
    """

    __slots__ = ("_always", "_tables", "ends", "entries", "stats")

    def __init__(self, groups: Sequence[Sequence[AuthorizationPolicy]]) -> None:
        entries: list[Entry] = []
        ends: list[int] = []
        for group in groups:
            entries.extend((p, r) for p in group for r in p.rules)
            ends.append(len(entries))
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.ends: tuple[int, ...] = tuple(ends)

        # Every dimension each rule could be filed under, and how many rules share each key.
        options: list[dict[int, _Keys]] = []
        shared: Counter[tuple[int, tuple[str, str]]] = Counter()
        for _, rule in self.entries:
            found: dict[int, _Keys] = {}
            for d, dim in enumerate(_DIMENSIONS):
                keys = _rule_keys(dim, rule)
                if keys is not None:
                    found[d] = keys
                    shared.update((d, tag) for tag in keys)
            options.append(found)

        # File each rule where a request hitting one of its keys finds the fewest rivals.
        filed: list[dict[tuple[str, str], list[int]]] = [{} for _ in _DIMENSIONS]
        always: list[int] = []
        for seq, found in enumerate(options):
            if not found:
                always.append(seq)
                continue
            best = min(
                found,
                key=lambda d: (sum(shared[d, tag] for tag in found[d]), d),
            )
            for tag in found[best]:
                filed[best].setdefault(tag, []).append(seq)

        self._always: Bucket = tuple(always)
        self._tables: tuple[_Table, ...] = tuple(
            _table(dim, filed[d]) for d, dim in enumerate(_DIMENSIONS) if filed[d]
        )
        self.stats = IndexStats(
            len(self.entries),
            {
                dim.name: len({s for seqs in filed[d].values() for s in seqs})
                for d, dim in enumerate(_DIMENSIONS)
            },
            len(always),
        )

    def candidates(self, attrs: Attributes) -> Sequence[int]:
        """Sequence numbers, ascending, of every rule that might match; no others can."""
        found: list[Bucket] = []
        for table in self._tables:
            value = table.get(attrs)
            if value is None:  # no positive value matches an absent attribute
                continue
            if table.fold_case:
                value = value.lower()
            bucket = table.exact.get(value)
            if bucket is not None:
                found.append(bucket)
            n = len(value)
            node = table.prefixes
            while node is not None and node[0] <= n:
                hit = node[1].get(value[: node[0]])
                if hit is None:
                    break
                if hit[0]:
                    found.append(hit[0])
                node = hit[1]
            node = table.suffixes
            while node is not None and node[0] <= n:
                hit = node[1].get(value[-node[0] :])
                if hit is None:
                    break
                if hit[0]:
                    found.append(hit[0])
                node = hit[1]
        if not found:
            return self._always
        if self._always:
            found.append(self._always)
        if len(found) == 1:
            return found[0]
        return sorted(set().union(*found))
