"""Envoy's ``x-forwarded-client-cert`` (XFCC) header.

Format, as Envoy documents it (HTTP connection manager, "HTTP header manipulation"):

* the value is a ``,``-separated list of elements, one per proxy hop that appended one, the
  first being the original client;
* an element is a ``;``-separated list of ``key=value`` pairs; keys are case-insensitive,
  values case-sensitive;
* a value holding ``,``, ``;`` or ``=`` is double-quoted, and a ``"`` inside it is written
  ``\\"``;
* the keys are ``By`` (URI SAN of the proxy's own certificate), ``Hash`` (SHA-256 of the
  client certificate), ``Cert`` and ``Chain`` (URL-encoded PEM), ``Subject`` (always quoted),
  ``URI`` and ``DNS`` (SANs of the client certificate; Envoy writes one pair per SAN, so they
  repeat, and so does ``By`` when the proxy's certificate has several URI SANs).

Choices where the documentation is silent, each the strict or the Envoy-compatible one:

* Inside quotes a backslash always pairs with the next character when looking for the closing
  quote, so ``"CN=x\\\\"`` ends at the last quote. Only ``\\"`` is decoded (to ``"``); any
  other ``\\X`` is kept as written, because Envoy puts an RFC 2253 subject between the quotes
  without escaping it, and ``\\,``/``\\\\`` there are the DN's own escapes.
* Envoy does not quote ``By``/``URI``/``DNS``, so an unquoted value may contain ``=``: the key
  ends at the first ``=`` and nothing is ambiguous. A ``"`` inside an unquoted value, or
  anything but ``;``/``,`` after a closing quote, is an error.
* Spaces and tabs around elements, pairs, keys and values are ignored (other proxies and
  header folding join with ``", "``); inside quotes they are kept.
* Empty ``By``/``URI``/``DNS`` values are dropped: Envoy writes ``URI=`` for a certificate
  without a URI SAN, and an empty string is no identity.
* ``Hash``, ``Cert``, ``Chain`` and ``Subject`` may appear once per element: two ``Subject``
  values are ambiguous, and an authorizer must not pick one.
* Unknown keys (any HTTP token) are ignored, so a newer Envoy adding a key does not break
  parsing; a key that is not a token is an error.

Malformed input raises :class:`~extauthz.errors.XfccError`. Messages name the element index
(0-based, 0 = original client), the key and the character offset, never a value: values
can be large (PEM) or personal (subjects), and messages reach deny bodies and logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import XfccError

__all__ = ["MAX_XFCC_BYTES", "MAX_XFCC_ELEMENTS", "XfccElement", "XfccError", "parse"]

MAX_XFCC_BYTES = 64 * 1024
"""Longest header accepted, in UTF-8 bytes: a chain of a few certificates fits easily, and
the bound keeps a hostile hop from making every request parse megabytes."""

MAX_XFCC_ELEMENTS = 32
"""Most elements (proxy hops) accepted; real meshes have a handful."""

_HEADER = "x-forwarded-client-cert"

# C0 controls except HTAB, and DEL: never legal in an HTTP field value.
_CTL = r"\x00-\x08\x0a-\x1f\x7f"
_CONTROL = re.compile(f"[{_CTL}]")

# One pair and the separator after it. Every part after the key is optional, so the pattern
# always matches and the groups say what went wrong. No class admits a control character, so
# one anywhere stops a match and fails the parse; parse() then names it, at no cost to valid
# headers. Nothing after the value classes can backtrack into them.
#   1 key (raw, may end in blanks)   2 "="   3 quoted content   4 closing quote
#   5 unquoted value                 6 separator: ";", "," or "" at the end (None: junk)
_PAIR = re.compile(
    rf"""[ \t]*
    ([^=;,"{_CTL}]*)
    (?:(=)[ \t]*
        (?:"([^"\\{_CTL}]*(?:\\[^{_CTL}][^"\\{_CTL}]*)*)(")?
          |([^;,"{_CTL}]*)
        )
    )?
    [ \t]*
    ([;,]|\Z)?""",
    re.VERBOSE,
)
# An HTTP token (RFC 9110 section 5.6.2): what an unknown key must look like.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

_BY, _HASH, _CERT, _CHAIN, _SUBJECT, _URI, _DNS = range(7)
_KEYS = {
    "by": _BY,
    "hash": _HASH,
    "cert": _CERT,
    "chain": _CHAIN,
    "subject": _SUBJECT,
    "uri": _URI,
    "dns": _DNS,
}
_NAMES = ("By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS")


@dataclass(frozen=True, slots=True)
class XfccElement:
    """One XFCC element: what one proxy hop knew about the client certificate it saw.

    Absent single-valued keys are ``''`` rather than ``None`` so that callers compare values
    without a None check; absent repeated keys are ``()``.
    """

    by: tuple[str, ...]
    """URI SANs of the certificate of the proxy that added this element."""
    hash: str
    """Hex SHA-256 of the client certificate."""
    cert: str
    """The client certificate, URL-decoded: PEM text."""
    chain: str
    """The client chain including the leaf, URL-decoded: concatenated PEM."""
    subject: str
    """The client certificate's subject DN, as the proxy printed it."""
    uris: tuple[str, ...]
    """URI SANs of the client certificate (SPIFFE IDs live here)."""
    dns: tuple[str, ...]
    """DNS SANs of the client certificate."""


def parse(value: str) -> tuple[XfccElement, ...]:
    """Parse an XFCC header value into its elements, original client first.

    One regex match per pair, all patterns compiled at import: this runs on the request path.
    Raise :class:`XfccError` naming what is wrong and where.
    """
    size = len(value)
    if size <= MAX_XFCC_BYTES and not value.isascii():  # isascii() is O(1) on str
        size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_XFCC_BYTES:
        raise XfccError(f"{_HEADER} is {size} bytes, over the limit of {MAX_XFCC_BYTES}")
    if not value.strip(" \t"):
        raise XfccError(f"{_HEADER} is empty")
    try:
        return _parse(value)
    except XfccError:
        bad = _CONTROL.search(value)
        if bad is None:
            raise
        raise XfccError(
            f"{_HEADER} holds control character U+{ord(bad.group()):04X} at offset {bad.start()}"
        ) from None


def _parse(value: str) -> tuple[XfccElement, ...]:
    """The one pass over a header already known to be non-empty and within the size limit."""
    elements: list[XfccElement] = []
    match = _PAIR.match
    pos = 0
    # The element being built: single-valued fields by slot (None = not seen), repeated ones.
    singles: list[str | None] = [None] * 7
    by: list[str] = []
    uris: list[str] = []
    dns: list[str] = []
    pairs = 0
    while True:
        m = match(value, pos)
        assert m is not None  # every part of _PAIR is optional: it always matches
        raw_key, eq, quoted, closed, bare, sep = m.groups()
        index = len(elements)
        if eq is None:
            raise _no_equals_error(m, index, raw_key, sep, pairs)
        slot = _KEYS.get(raw_key.lower())
        if slot is None:
            slot = _known_or_ignored(raw_key, index, m.start(1))
        if quoted is not None:
            if closed is None:
                raise XfccError(
                    f"{_HEADER} element {index}, key {_name(slot, raw_key)}: unterminated"
                    f" quoted value starting at offset {m.start(3) - 1}"
                )
            text = quoted.replace('\\"', '"') if "\\" in quoted else quoted
        else:
            text = bare.rstrip(" \t")
        if sep is None:
            raise _junk_error(value, m, index, _name(slot, raw_key), quoted is not None)
        pairs += 1

        if slot == _URI:
            if text:
                uris.append(text)
        elif slot == _DNS:
            if text:
                dns.append(text)
        elif slot == _BY:
            if text:
                by.append(text)
        elif slot is not None:
            if singles[slot] is not None:
                raise XfccError(
                    f"{_HEADER} element {index}: duplicate key {_NAMES[slot]}"
                    f" at offset {m.start(1)}"
                )
            if slot in (_CERT, _CHAIN):
                text = _url_decode(text, index, _NAMES[slot])
            singles[slot] = text

        pos = m.end()
        if sep == ";":
            continue
        elements.append(
            XfccElement(
                by=tuple(by),
                hash=singles[_HASH] or "",
                cert=singles[_CERT] or "",
                chain=singles[_CHAIN] or "",
                subject=singles[_SUBJECT] or "",
                uris=tuple(uris),
                dns=tuple(dns),
            )
        )
        if not sep:  # end of the header
            return tuple(elements)
        if len(elements) == MAX_XFCC_ELEMENTS:
            raise XfccError(
                f"{_HEADER} has more than {MAX_XFCC_ELEMENTS} elements"
                f" (element {MAX_XFCC_ELEMENTS} starts at offset {pos})"
            )
        singles = [None] * 7
        by, uris, dns = [], [], []
        pairs = 0


def _name(slot: int | None, raw_key: str) -> str:
    """The key as messages show it: canonical spelling if known, else a bounded repr."""
    if slot is not None:
        return _NAMES[slot]
    key = raw_key.rstrip(" \t")
    return repr(key if len(key) <= 40 else key[:40] + "...")


def _known_or_ignored(raw_key: str, index: int, offset: int) -> int | None:
    """Slow path for a key not spelled exactly as a known one (any case): it may only carry
    trailing blanks. Unknown keys are ignored (None) so a newer Envoy adding one does not
    break us; empty or non-token keys are errors."""
    key = raw_key.rstrip(" \t")
    slot = _KEYS.get(key.lower())
    if slot is not None:
        return slot
    if not key:
        raise XfccError(
            f"{_HEADER} element {index} has a pair with an empty key at offset {offset}"
        )
    if _TOKEN.fullmatch(key) is None:
        raise XfccError(
            f"{_HEADER} element {index}: key {_name(None, key)} is not an HTTP token"
            f" at offset {offset}"
        )
    return None


def _no_equals_error(
    m: re.Match[str], index: int, raw_key: str, sep: str | None, pairs: int
) -> XfccError:
    """What to say about a pair that has no "=": a stray separator, a bare word, or a '"'
    where a key was expected."""
    offset = m.start(1)
    if sep is None:  # the key was stopped by a '"'
        return XfccError(
            f"{_HEADER} element {index}: unexpected '\"' in key {_name(None, raw_key)}"
            f" at offset {m.end(1)}"
        )
    if raw_key:
        return XfccError(
            f"{_HEADER} element {index}: pair {_name(None, raw_key)} has no '=' at offset {offset}"
        )
    if sep == ";" or pairs:
        return XfccError(
            f"{_HEADER} element {index} has an empty pair (stray ';') at offset {offset}"
        )
    return XfccError(
        f"{_HEADER} element {index} has no key=value pairs (stray ',') at offset {offset}"
    )


def _junk_error(value: str, m: re.Match[str], index: int, key: str, quoted: bool) -> XfccError:
    """The value did not end at ';', ',' or the end of the header."""
    offset = m.end()
    if quoted:
        return XfccError(
            f"{_HEADER} element {index}, key {key}: unexpected {value[offset]!r} after the"
            f" closing quote at offset {offset} (expected ';' or ',')"
        )
    return XfccError(
        f"{_HEADER} element {index}, key {key}: unexpected '\"' inside an unquoted value"
        f" at offset {offset}"
    )


def _url_decode(text: str, index: int, key: str) -> str:
    """Cert/Chain are percent-encoded PEM; an escape that is not UTF-8 means a corrupt value."""
    if "%" not in text:
        return text
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise XfccError(
            f"{_HEADER} element {index}, key {key}: percent-encoding does not decode to UTF-8"
        ) from None
