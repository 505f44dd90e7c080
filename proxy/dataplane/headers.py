"""Header hygiene between client, proxy and upstream (SPEC §3.2, §3.5).

Requests: what the client sent is stripped first (hop-by-hop headers, headers named in
``Connection``, identity claims, framing), then the proxy adds its own (the upstream credential,
``x-request-id`` and the forwarding headers). Forwarding headers from the client are kept only
when the peer is a trusted proxy; otherwise they are replaced by what the proxy saw itself.

Responses: hop-by-hop headers, headers named in ``Connection`` and any header the caller wants
hidden (the upstream's safety-flag header) are dropped before the client sees them.

Request smuggling: aiohttp 3.14's HTTP parser (both the C ``llhttp``-based parser and the
pure-Python one) already answers ``400 Bad Request`` with a ``text/plain`` body and closes the
connection, before any handler runs, for a request with both ``Content-Length`` and
``Transfer-Encoding`` (in either order, whatever the coding, also for HTTP/1.0), for a duplicate
``Content-Length`` (equal values or not), for a list value such as ``Content-Length: 4, 4``, for
a signed value (``+4``, ``-1``), for a duplicated ``Transfer-Encoding`` and for whitespace before
the colon. :func:`smuggling_error` repeats the framing checks so the guarantee does not rest on
one parser's behaviour alone.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

IDENTITY_HEADERS: frozenset[str] = frozenset(
    {
        "authorization",
        "api-key",
        "x-workspace-id",
        "x-org-id",
        "x-organization-id",
        "x-api-key-id",
        "openai-organization",
        "openai-project",
    }
)

# Forwarding headers: kept from a trusted peer, otherwise replaced by the proxy's own view.
FORWARDING_HEADERS: frozenset[str] = frozenset(
    {"x-forwarded-for", "forwarded", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}
)

# The body is read in full before forwarding, so its framing is recomputed by the client
# library; an ``Expect: 100-continue`` was answered by this server and must not go further.
_FRAMING = frozenset({"host", "content-length", "expect"})

_REQUEST_DROP: frozenset[str] = HOP_BY_HOP | IDENTITY_HEADERS | _FRAMING | FORWARDING_HEADERS
_RESPONSE_DROP: frozenset[str] = HOP_BY_HOP

TrustedProxies = tuple[IPv4Network | IPv6Network, ...]

# Browsers cannot set headers on a WebSocket: the Realtime API's clients pass the key as a
# subprotocol ``openai-insecure-api-key.<key>``. It identifies the caller and never goes upstream.
SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    """Whether the request asks to become a WebSocket (``Upgrade: websocket`` on a GET)."""
    upgrade = request.headers.get("upgrade")
    if upgrade is None:
        return False
    return any(token.strip().lower() == "websocket" for token in upgrade.split(","))


def subprotocol_key(headers: CIMultiDictProxy[str]) -> str | None:
    """The key a WebSocket client offered as a subprotocol, if any."""
    for value in headers.getall("sec-websocket-protocol", []):
        for proto in value.split(","):
            proto = proto.strip()
            if proto.lower().startswith(SUBPROTOCOL_KEY_PREFIX):
                return proto[len(SUBPROTOCOL_KEY_PREFIX) :] or None
    return None


def connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    """Header names listed in every ``Connection`` header, lowercased."""
    if "connection" not in headers:
        return frozenset()
    tokens: set[str] = set()
    for value in headers.getall("connection"):
        for token in value.split(","):
            token = token.strip()
            if token:
                tokens.add(token.lower())
    return frozenset(tokens)


def peer_is_trusted(peer: str | None, trusted_proxies: TrustedProxies) -> bool:
    if not trusted_proxies or not peer:
        return False
    try:
        address = ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted_proxies)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _forwarded_element(peer: str | None, host: str | None, scheme: str) -> str:
    if peer is None:
        node = "unknown"
    elif ":" in peer:
        node = _quoted(f"[{peer}]")
    else:
        node = peer
    element = f"for={node}"
    if host:
        element += f";host={_quoted(host)}"
    return f"{element};proto={scheme}"


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    peer: str | None,
    trusted_proxies: TrustedProxies,
    upstream_api_key: str | None,
    request_id: str,
    host: str | None,
    scheme: str = "http",
) -> CIMultiDict[str]:
    """The headers to send upstream for a client request.

    ``peer`` is the address of the TCP peer (``request.remote``), ``host`` the client's ``Host``
    and ``scheme`` the scheme the client used to reach this proxy.
    """
    drop = _REQUEST_DROP
    named = connection_tokens(headers)
    if named:
        drop = drop | named
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)

    if upstream_api_key:
        out["Authorization"] = "Bearer " + upstream_api_key
    out["X-Request-Id"] = request_id

    ours = _forwarded_element(peer, host, scheme)
    if peer_is_trusted(peer, trusted_proxies):
        # Forwarding headers named in Connection are hop-by-hop and dropped even from a
        # trusted peer.
        prior_xff = [] if "x-forwarded-for" in named else headers.getall("x-forwarded-for", [])
        if peer:
            prior_xff.append(peer)
        if prior_xff:
            out["X-Forwarded-For"] = ", ".join(prior_xff)
        prior_fwd = [] if "forwarded" in named else headers.getall("forwarded", [])
        prior_fwd.append(ours)
        out["Forwarded"] = ", ".join(prior_fwd)
        for name, own in (
            ("x-forwarded-proto", scheme),
            ("x-forwarded-host", host),
            ("x-real-ip", None),
        ):
            kept = None if name in named else headers.get(name)
            if kept is not None:
                out[name] = kept
            elif own:
                out[name] = own
    else:
        if peer:
            out["X-Forwarded-For"] = peer
        out["Forwarded"] = ours
        out["X-Forwarded-Proto"] = scheme
        if host:
            out["X-Forwarded-Host"] = host
    return out


def copy_response_headers(
    upstream_headers: CIMultiDictProxy[str] | CIMultiDict[str],
    target: CIMultiDict[str],
    *,
    strip: frozenset[str],
) -> None:
    """Add the upstream response headers the client may see to ``target``."""
    drop = _RESPONSE_DROP
    named = connection_tokens(upstream_headers)
    if named:
        drop = drop | named
    if "transfer-encoding" in upstream_headers:
        # The upstream framed the body in chunks; this server frames it again on its own.
        drop = drop | {"content-length"}
    for name, value in upstream_headers.items():
        lowered = name.lower()
        if lowered not in drop and lowered not in strip:
            target.add(name, value)


def downstream_response_headers(
    upstream_headers: CIMultiDictProxy[str] | CIMultiDict[str], *, strip: frozenset[str]
) -> CIMultiDict[str]:
    """The upstream response headers the client may see.

    Drops hop-by-hop headers, headers named in ``Connection``, ``content-length`` when the
    upstream body was chunked (it is re-chunked on the way out) and every name in ``strip``
    (lowercase).
    """
    out: CIMultiDict[str] = CIMultiDict()
    copy_response_headers(upstream_headers, out, strip=strip)
    return out


def smuggling_error(request: web.BaseRequest) -> str | None:
    """Why the request's framing is ambiguous, or ``None`` when it is not (SPEC §3.5).

    Defence in depth: aiohttp's parser already refuses these requests with a plain-text 400
    before any handler runs (see the module docstring).
    """
    headers = request.headers
    if "content-length" not in headers:
        return None
    if len(headers.getall("content-length")) > 1:
        return "Duplicate Content-Length headers."
    if "transfer-encoding" in headers:
        return "Content-Length and Transfer-Encoding must not both be present."
    return None
