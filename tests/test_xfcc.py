"""The x-forwarded-client-cert parser: Envoy's documented examples, quoting, limits, errors.

Format reference: Envoy, HTTP connection manager, "HTTP header manipulation",
x-forwarded-client-cert.
"""

from __future__ import annotations

import datetime
import re
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from extauthz.errors import IdentityError, XfccError
from extauthz.identity.xfcc import MAX_XFCC_BYTES, MAX_XFCC_ELEMENTS, XfccElement, parse

HASH_A = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"
HASH_B = "9ba61d6425303443c0748a02dd8de688468ed33be74eee6556d90c0149c1309e"
LYFT_SUBJECT = "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"


def element(
    *,
    by: tuple[str, ...] = (),
    hash: str = "",
    cert: str = "",
    chain: str = "",
    subject: str = "",
    uris: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
) -> XfccElement:
    return XfccElement(
        by=by, hash=hash, cert=cert, chain=chain, subject=subject, uris=uris, dns=dns
    )


# --- Envoy's documented examples ----------------------------------------------------------

ENVOY_EXAMPLES: list[tuple[str, tuple[XfccElement, ...]]] = [
    # one client certificate with only a URI SAN
    (
        "By=http://frontend.lyft.com;"
        f"Hash={HASH_A};"
        f'Subject="{LYFT_SUBJECT}";'
        "URI=http://testclient.lyft.com",
        (
            element(
                by=("http://frontend.lyft.com",),
                hash=HASH_A,
                subject=LYFT_SUBJECT,
                uris=("http://testclient.lyft.com",),
            ),
        ),
    ),
    # two client certificates with only URI SANs: the first element is the original client
    (
        f"By=http://frontend.lyft.com;Hash={HASH_A};URI=http://testclient.lyft.com,"
        f"By=http://backend.lyft.com;Hash={HASH_B};URI=http://frontend.lyft.com",
        (
            element(
                by=("http://frontend.lyft.com",),
                hash=HASH_A,
                uris=("http://testclient.lyft.com",),
            ),
            element(
                by=("http://backend.lyft.com",),
                hash=HASH_B,
                uris=("http://frontend.lyft.com",),
            ),
        ),
    ),
    # one client certificate with both URI and DNS SANs; DNS repeats, one pair per SAN
    (
        f"By=http://frontend.lyft.com;Hash={HASH_A};"
        f'Subject="{LYFT_SUBJECT}";'
        "URI=http://testclient.lyft.com;DNS=lyft.com;DNS=www.lyft.com",
        (
            element(
                by=("http://frontend.lyft.com",),
                hash=HASH_A,
                subject=LYFT_SUBJECT,
                uris=("http://testclient.lyft.com",),
                dns=("lyft.com", "www.lyft.com"),
            ),
        ),
    ),
]


@pytest.mark.parametrize(("header", "expected"), ENVOY_EXAMPLES)
def test_envoy_documented_examples(header: str, expected: tuple[XfccElement, ...]) -> None:
    assert parse(header) == expected


# --- values: quoting, escapes, repeats, case, whitespace ----------------------------------

# (header, expected elements)
VALID: list[tuple[str, tuple[XfccElement, ...]]] = [
    # separators and '=' inside quotes are literal
    ('Subject="CN=a,O=b;c=d"', (element(subject="CN=a,O=b;c=d"),)),
    ('URI="spiffe://td/a;b,c=d";DNS=x', (element(uris=("spiffe://td/a;b,c=d",), dns=("x",)),)),
    # \" is an escaped quote
    (r'Subject="CN=say \"hi\""', (element(subject='CN=say "hi"'),)),
    (r'Subject="\"";URI=u', (element(subject='"', uris=("u",)),)),
    (r'Subject="a\",b=\";c"', (element(subject='a",b=";c'),)),
    # other backslash escapes are kept as written: they are the RFC 2253 DN's own
    (r'Subject="CN=x,O=Acme\, Inc."', (element(subject=r"CN=x,O=Acme\, Inc."),)),
    (r'Subject="CN=a\+b\<c\>"', (element(subject=r"CN=a\+b\<c\>"),)),
    # a backslash pairs with the next character, so an escaped backslash ends the value
    (r'Subject="CN=x\\";URI=u', (element(subject="CN=x\\\\", uris=("u",)),)),
    (r'Subject="\\\"";URI=u', (element(subject='\\\\"', uris=("u",)),)),
    # empty values: Envoy writes URI= for a certificate without a URI SAN, Subject="" when
    # the subject is empty; empty SANs are no identity and are dropped
    ('Hash=h;Subject="";URI=', (element(hash="h"),)),
    ("By=;URI=;DNS=;DNS=d", (element(dns=("d",)),)),
    ('URI="";Hash=""', (element(),)),
    # an unquoted value may hold '=' (Envoy does not quote URI SANs); the key is up to the first
    ("URI=http://x.example/?a=b&c=d", (element(uris=("http://x.example/?a=b&c=d",)),)),
    # repeated URI, DNS and By keep their order
    (
        "By=spiffe://td/gw;By=http://gw;URI=spiffe://td/a;URI=http://a;DNS=a;DNS=b;DNS=c",
        (
            element(
                by=("spiffe://td/gw", "http://gw"),
                uris=("spiffe://td/a", "http://a"),
                dns=("a", "b", "c"),
            ),
        ),
    ),
    # keys are case-insensitive, values are not
    (
        'by=B;HASH=H;subject="S";uRi=U;dns=D;Dns=E;DNS=F;bY=B2',
        (element(by=("B", "B2"), hash="H", subject="S", uris=("U",), dns=("D", "E", "F")),),
    ),
    # unknown keys are ignored, quoted or not
    ('Foo=bar;URI=u;X-New-Key="a,b;c";Hash=h', (element(uris=("u",), hash="h"),)),
    ("Foo=1", (element(),)),
    # whitespace around elements, pairs, keys and values
    (
        " By=a , URI=b ,\tURI=c\t",
        (element(by=("a",)), element(uris=("b",)), element(uris=("c",))),
    ),
    ('By = a ;  Subject = "  s  " ;URI\t=\tu', (element(by=("a",), subject="  s  ", uris=("u",)),)),
    # spaces inside an unquoted value are kept (old Envoy printed unquoted slash subjects)
    (
        "Subject=/C=US/L=San Francisco;URI=u",
        (element(subject="/C=US/L=San Francisco", uris=("u",)),),
    ),
    # non-ASCII is fine
    (
        'Subject="CN=Jürgen";DNS=bücher.example',
        (element(subject="CN=Jürgen", dns=("bücher.example",)),),
    ),
]


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_valid(header: str, expected: tuple[XfccElement, ...]) -> None:
    assert parse(header) == expected


def test_element_is_frozen() -> None:
    (parsed,) = parse("URI=spiffe://td/a")
    with pytest.raises(AttributeError):
        parsed.uris = ("spiffe://td/b",)  # type: ignore[misc]


# --- Cert and Chain: URL-encoded PEM --------------------------------------------------------


def _self_signed(common_name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://example.org/ns/a/sa/b"),
                    x509.DNSName("client.example.org"),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def certs() -> tuple[x509.Certificate, x509.Certificate]:
    return _self_signed("client"), _self_signed("intermediate")


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_cert_round_trips_to_pem(certs: tuple[x509.Certificate, x509.Certificate]) -> None:
    leaf, _ = certs
    pem = _pem(leaf)
    digest = leaf.fingerprint(hashes.SHA256()).hex()
    header = (
        f'By=spiffe://example.org/gw;Hash={digest};Cert="{quote(pem, safe="")}";'
        'Subject="CN=client";URI=spiffe://example.org/ns/a/sa/b;DNS=client.example.org'
    )
    (parsed,) = parse(header)
    assert parsed.cert == pem
    assert parsed.hash == digest
    assert x509.load_pem_x509_certificate(parsed.cert.encode()) == leaf


def test_chain_round_trips_to_pem(certs: tuple[x509.Certificate, x509.Certificate]) -> None:
    chain = _pem(certs[0]) + _pem(certs[1])
    (parsed,) = parse(f'Chain="{quote(chain, safe="")}";URI=u')
    assert parsed.chain == chain
    assert x509.load_pem_x509_certificates(parsed.chain.encode()) == list(certs)


def test_cert_unquoted_and_in_a_later_element(
    certs: tuple[x509.Certificate, x509.Certificate],
) -> None:
    pem = _pem(certs[1])
    first, second = parse(f"URI=u, Cert={quote(pem, safe='')};By=b")
    assert first.cert == ""
    assert second.cert == pem
    assert second.by == ("b",)


def test_cert_plus_is_not_a_space() -> None:
    """Envoy percent-encodes; '+' is a literal plus (PEM base64 uses it), not form encoding."""
    (parsed,) = parse('Cert="a+b%2Bc%0A"')
    assert parsed.cert == "a+b+c\n"


# --- malformed input ------------------------------------------------------------------------

# (header, fragment of the message)
MALFORMED: list[tuple[str, str]] = [
    ("", "x-forwarded-client-cert is empty"),
    (" \t ", "x-forwarded-client-cert is empty"),
    # unterminated quotes
    ('Subject="abc', "element 0, key Subject: unterminated quoted value starting at offset 8"),
    ('By=a,Subject="abc\\"', "element 1, key Subject: unterminated quoted value"),
    ('URI=u;Subject="abc\\', "element 0, key Subject: unterminated quoted value"),
    ('Foo="abc', "element 0, key 'Foo': unterminated quoted value"),
    # a pair without '='
    ("By", "element 0: pair 'By' has no '=' at offset 0"),
    ("By=a;Hash", "element 0: pair 'Hash' has no '=' at offset 5"),
    ("By=a,URI=b;garbage", "element 1: pair 'garbage' has no '='"),
    # empty keys
    ("=x", "element 0 has a pair with an empty key at offset 0"),
    ("By=a, =x", "element 1 has a pair with an empty key"),
    ("By=a; \t=x", "element 0 has a pair with an empty key at offset 7"),
    # elements with no pairs
    (",", "element 0 has no key=value pairs (stray ',') at offset 0"),
    (",By=a", "element 0 has no key=value pairs"),
    ("By=a,", "element 1 has no key=value pairs (stray ',') at offset 5"),
    ("By=a,,By=b", "element 1 has no key=value pairs"),
    ("By=a, ,By=b", "element 1 has no key=value pairs"),
    # empty pairs inside an element
    (";By=a", "element 0 has an empty pair (stray ';') at offset 0"),
    ("By=a;;URI=b", "element 0 has an empty pair (stray ';')"),
    ("By=a;", "element 0 has an empty pair (stray ';') at offset 5"),
    ("By=a,URI=b;,By=c", "element 1 has an empty pair"),
    # junk after a closing quote, quotes where they cannot be
    ('Subject="x"y', "element 0, key Subject: unexpected 'y' after the closing quote at offset 11"),
    ('Subject="x" "y"', "key Subject: unexpected '\"' after the closing quote"),
    ('By=a"b"', "element 0, key By: unexpected '\"' inside an unquoted value at offset 4"),
    ('"By"=a', "element 0: unexpected '\"' in key '' at offset 0"),
    ('B"y=a', "element 0: unexpected '\"' in key 'B' at offset 1"),
    # keys that are not HTTP tokens
    ("a b=c", "element 0: key 'a b' is not an HTTP token at offset 0"),
    ("URI=u;ключ=x", "key 'ключ' is not an HTTP token"),
    # single-valued keys may appear once per element
    ("Hash=a;HASH=b", "element 0: duplicate key Hash at offset 7"),
    ('Subject="a";subject="b"', "element 0: duplicate key Subject"),
    ("Cert=a;Cert=b", "duplicate key Cert"),
    ("Chain=a;chain=b", "duplicate key Chain"),
    ("By=a,By=b,Hash=1;Hash=2", "element 2: duplicate key Hash"),
    # Cert/Chain must percent-decode to UTF-8
    ("Cert=%ff", "element 0, key Cert: percent-encoding does not decode to UTF-8"),
    ('URI=u,Chain="%C3%28"', "element 1, key Chain: percent-encoding does not decode to UTF-8"),
    # control characters, wherever they are
    ("By=a\x00", "control character U+0000 at offset 4"),
    ("\nBy=a", "control character U+000A at offset 0"),
    ("By=a\r\nURI=b", "control character U+000D at offset 4"),
    ('Subject="a\x1fb"', "control character U+001F at offset 10"),
    ('Subject="a\\\x01"', "control character U+0001 at offset 11"),
    ("B\x7fy=a", "control character U+007F at offset 1"),
    ("Foo=\x08", "control character U+0008 at offset 4"),
]


@pytest.mark.parametrize(("header", "fragment"), MALFORMED)
def test_malformed(header: str, fragment: str) -> None:
    with pytest.raises(XfccError) as info:
        parse(header)
    assert fragment in str(info.value)


def test_error_is_an_identity_error_with_a_stable_reason() -> None:
    with pytest.raises(IdentityError) as info:
        parse("By")
    assert isinstance(info.value, XfccError)
    assert info.value.reason == "xfcc_invalid"


@pytest.mark.parametrize(
    "header",
    [
        'Subject="CN=secret-person',
        'Subject="CN=secret-person"junk',
        "Cert=secret-person%ff",
        'URI=a"secret-person"',
    ],
)
def test_messages_never_echo_values(header: str) -> None:
    """Values can be personal or huge, and messages reach deny bodies and logs."""
    with pytest.raises(XfccError) as info:
        parse(header)
    assert "secret" not in str(info.value)


def test_tab_is_not_a_control_character() -> None:
    assert parse('By=a\tb;Subject="\tx\t"') == (element(by=("a\tb",), subject="\tx\t"),)


# --- limits at the boundary -----------------------------------------------------------------


def test_size_limit_ascii_boundary() -> None:
    at_limit = "DNS=" + "a" * (MAX_XFCC_BYTES - 4)
    assert len(at_limit) == MAX_XFCC_BYTES
    assert parse(at_limit)[0].dns == ("a" * (MAX_XFCC_BYTES - 4),)
    with pytest.raises(XfccError, match=rf"is {MAX_XFCC_BYTES + 1} bytes, over the limit of"):
        parse(at_limit + "a")


def test_size_limit_counts_utf8_bytes_not_characters() -> None:
    at_limit = "DNS=" + "é" * ((MAX_XFCC_BYTES - 4) // 2)
    assert len(at_limit.encode()) == MAX_XFCC_BYTES
    assert len(parse(at_limit)[0].dns[0]) == (MAX_XFCC_BYTES - 4) // 2
    over = at_limit + "a"
    assert len(over) < MAX_XFCC_BYTES  # far fewer characters than bytes
    with pytest.raises(XfccError, match=rf"is {MAX_XFCC_BYTES + 1} bytes"):
        parse(over)


def test_size_limit_is_checked_before_anything_else() -> None:
    with pytest.raises(XfccError, match="over the limit"):
        parse('Subject="' + "\x00" * MAX_XFCC_BYTES)


def test_element_limit_boundary() -> None:
    hops = [f"By=spiffe://td/hop{i};URI=spiffe://td/client{i}" for i in range(MAX_XFCC_ELEMENTS)]
    parsed = parse(",".join(hops))
    assert len(parsed) == MAX_XFCC_ELEMENTS
    assert parsed[0].uris == ("spiffe://td/client0",)
    assert parsed[-1].by == (f"spiffe://td/hop{MAX_XFCC_ELEMENTS - 1}",)
    with pytest.raises(XfccError, match=rf"more than {MAX_XFCC_ELEMENTS} elements"):
        parse(",".join([*hops, "URI=spiffe://td/one-too-many"]))


def test_commas_inside_quotes_do_not_count_as_elements() -> None:
    header = 'Subject="' + "," * (MAX_XFCC_ELEMENTS * 2) + '"'
    assert len(parse(header)) == 1


# --- properties -----------------------------------------------------------------------------

KNOWN_KEYS = ("By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS")
SINGLE_KEYS = ("Hash", "Cert", "Chain", "Subject")

# Everything a value may hold: the characters that matter to the grammar, and any printable
# or non-ASCII text (control characters are never legal; surrogates cannot be UTF-8).
_CHARS = st.one_of(
    st.sampled_from('",;=\\ \t%'),
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")),
)
# A value that the quote-and-escape-'"' serializer can write unambiguously: an odd run of
# backslashes just before a '"' or the end would eat the escape or the closing quote.
_ODD_BACKSLASHES = re.compile(r'(?<!\\)(?:\\\\)*\\(?="|\Z)')
VALUES = st.text(_CHARS, max_size=30).filter(lambda v: _ODD_BACKSLASHES.search(v) is None)


def _quote(value: str) -> str:
    return '"' + value.replace('"', '\\"') + '"'


@st.composite
def _key_case(draw: st.DrawFn, key: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in key)


@st.composite
def elements_and_pairs(draw: st.DrawFn) -> tuple[XfccElement, list[tuple[str, str]]]:
    """An element and the pairs, in random order and key case, that serialize it."""
    singles = draw(st.fixed_dictionaries({}, optional=dict.fromkeys(SINGLE_KEYS, VALUES)))
    repeated = {
        key: draw(st.lists(VALUES.filter(bool), max_size=3)) for key in ("By", "URI", "DNS")
    }
    pairs = [(key, value) for key, value in singles.items()]
    pairs += [(key, value) for key, values in repeated.items() for value in values]
    if not pairs:
        pairs = [("Hash", "")]
    # relative order of repeated keys is kept; everything else may move
    order = draw(st.permutations(range(len(pairs))))
    shuffled = [pairs[i] for i in order]
    for key in ("By", "URI", "DNS"):
        positions = sorted(i for i, (k, _) in enumerate(shuffled) if k == key)
        for position, value in zip(positions, repeated[key], strict=True):
            shuffled[position] = (key, value)
    expected = element(
        by=tuple(repeated["By"]),
        hash=singles.get("Hash", ""),
        cert=singles.get("Cert", ""),
        chain=singles.get("Chain", ""),
        subject=singles.get("Subject", ""),
        uris=tuple(repeated["URI"]),
        dns=tuple(repeated["DNS"]),
    )
    cased = [(draw(_key_case(key)), value) for key, value in shuffled]
    return expected, cased


def _serialize_pair(key: str, value: str) -> str:
    if key.lower() in ("cert", "chain"):  # Envoy URL-encodes the PEM before quoting it
        value = quote(value, safe="")
    return f"{key}={_quote(value)}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(elements_and_pairs(), min_size=1, max_size=5),
    st.sampled_from([",", ", ", " , ", ",\t"]),
)
def test_serialized_elements_round_trip(
    drawn: list[tuple[XfccElement, list[tuple[str, str]]]], comma: str
) -> None:
    header = comma.join(";".join(_serialize_pair(k, v) for k, v in pairs) for _, pairs in drawn)
    assert parse(header) == tuple(expected for expected, _ in drawn)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.text(st.sampled_from(list('"\\,;= \t\x00=ByURIDNShashCertSubject%ab'))),
    )
)
@example('Subject="\\')
@example("\udc80=x")
@example('URI="' + "\\" * 3)
def test_arbitrary_text_parses_or_raises_xfcc_error(text: str) -> None:
    try:
        result = parse(text)
    except XfccError:
        return
    assert isinstance(result, tuple)
    assert result
    assert all(isinstance(e, XfccElement) for e in result)
