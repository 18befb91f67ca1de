"""Who may use the server: the Host it is addressed by and the Origin of the page that calls it.

A server on 127.0.0.1 is still reachable from every web page its user opens: a page can POST
a form to it (a "simple" cross-origin request, sent without asking), and through DNS
rebinding (a name of the attacker's that first points to their server, then to 127.0.0.1) it
can even read the answers. Two checks stop both:

- **Host.** A request is answered only when its ``Host`` header names an address the server
  is served at: ``localhost``, ``127.0.0.1``, ``[::1]``, the address it listens on (``--host``)
  and the names in ``allowed_hosts`` (``--allow-host``), with the port it listens on.
  Listening on every address (``0.0.0.0`` or ``::``), any IP address is accepted too (a
  rebinding page is always addressed by a name). Others get 400. A request without a
  ``Host`` (HTTP/1.0 tools) is answered: browsers always send one.
- **Origin.** A POST (any method but GET, HEAD and OPTIONS) from a web page is accepted only
  from the server's own page: its ``Origin`` must be the origin the request was sent to, or
  one of ``allowed_origins`` (``--allow-origin``; ``"*"``: any). Without an ``Origin``, a
  browser's ``Sec-Fetch-Site`` must say ``same-origin`` or ``none``; requests from tools such
  as curl carry neither header and are accepted. Others get 403.

Allowed origins may also read the answers (CORS headers); the server's own page needs none.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: The names of this computer every local server answers to.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

#: Addresses that mean "every interface": any IP address may then name the server.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def split_host(value: str) -> tuple[str, int | None] | None:
    """``"name:port"``, ``"[v6]:port"`` or a bare name or address -> (lower-case host, port);
    None when the value is malformed.

    Example:
        >>> split_host("LocalHost:8000"), split_host("[::1]:80"), split_host("10.0.0.2")
        (('localhost', 8000), ('::1', 80), ('10.0.0.2', None))
        >>> split_host("evil.example:http") is None
        True
    """
    value = value.strip().lower()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    elif ":" in value:  # a bare IPv6 address (not valid in a Host header, but unambiguous)
        host, port_text = value, None
    else:
        host, port_text = value, None
    host = host.rstrip(".")  # "localhost." names the same host
    if not host:
        return None
    if port_text is None:
        return host, None
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        return None
    return host, int(port_text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _origin(value: str) -> str:
    return value.strip().rstrip("/").lower()


class HostOriginGuard:
    """ASGI middleware: the Host and Origin checks of the module docstring.

    Parameters:
        app: the application to guard.
        allowed_hosts: host names or addresses accepted besides ``LOOPBACK_HOSTS``, each
            optionally with ``:port`` (then only that port; else the port the server listens
            on); a wildcard address (``0.0.0.0``, ``::``) accepts every IP address; ``"*"``
            accepts any Host (no check).
        allowed_origins: origins (``scheme://host[:port]``) whose pages may POST; ``"*"``: any.

    Example:
        >>> from fastapi import FastAPI
        >>> from fastapi.testclient import TestClient
        >>> app = FastAPI()
        >>> @app.post("/hello")
        ... def hello():
        ...     return "hello"
        >>> app.add_middleware(HostOriginGuard)
        >>> client = TestClient(app, base_url="http://localhost:8000")
        >>> client.post("/hello").json()
        'hello'
        >>> client.post("/hello", headers={"Origin": "http://localhost:8000"}).json()
        'hello'
        >>> refused = client.post("/hello", headers={"Origin": "https://evil.example"})
        >>> refused.status_code, refused.json()["detail"].split(":")[0]
        (403, 'cross-origin request refused')
        >>> client.post("/hello", headers={"Host": "evil.example:8000"}).status_code
        400
    """

    def __init__(
        self,
        app: ASGIApp,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.any_host = False
        self.any_ip = False
        self.hosts: set[tuple[str, int | None]] = {(name, None) for name in LOOPBACK_HOSTS}
        for entry in allowed_hosts:
            entry = entry.strip()
            if entry == "*":
                self.any_host = True
            elif entry.strip("[]") in WILDCARD_HOSTS:
                self.any_ip = True
            elif (parsed := split_host(entry)) is not None:
                self.hosts.add(parsed)
            else:
                raise ValueError(f"not a host name or address: {entry!r}")
        origins = {_origin(origin) for origin in allowed_origins}
        for origin in origins - {"*"}:
            scheme, sep, rest = origin.partition("://")
            if scheme not in ("http", "https") or not sep or split_host(rest) is None:
                raise ValueError(
                    f"not an origin: {origin!r}; write it as scheme://host[:port], e.g. "
                    "http://localhost:3000 (or * for any page)"
                )
        self.any_origin = "*" in origins
        self.origins = origins - {"*"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host = headers.get("host")
        refusal = None
        if host is not None and not self._host_allowed(host, scope):
            refusal = 400, self._host_message(host, scope)
        elif scope["type"] == "http" and scope["method"] not in _SAFE_METHODS:
            origin = headers.get("origin")
            served = f"{scope.get('scheme', 'http')}://{host}" if host else None
            if not self._origin_allowed(origin, served, headers.get("sec-fetch-site")):
                refusal = 403, _origin_message(origin, served)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await JSONResponse({"detail": refusal[1]}, refusal[0])(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": 1008})

    def _host_allowed(self, value: str, scope: Scope) -> bool:
        if self.any_host:
            return True
        parsed = split_host(value)
        if parsed is None:
            return False
        name, port = parsed
        if (name, port) in self.hosts and port is not None:
            return True  # an entry naming this very port
        if (name, None) not in self.hosts and not (self.any_ip and _is_ip(name)):
            return False
        served_port = _served_port(scope)
        if served_port is None:
            return True
        default = 443 if scope.get("scheme") in ("https", "wss") else 80
        return (port if port is not None else default) == served_port

    def _origin_allowed(
        self, origin: str | None, served: str | None, fetch_site: str | None
    ) -> bool:
        if self.any_origin:
            return True
        if origin is None:
            # Browsers send Origin with every cross-origin POST; Sec-Fetch-Site backs it up.
            return fetch_site in (None, "same-origin", "none")
        origin = _origin(origin)
        return origin in self.origins or (served is not None and origin == _origin(served))

    def _host_message(self, value: str, scope: Scope) -> str:
        port = _served_port(scope)
        suffix = f":{port}" if port is not None else ""
        names = ", ".join(
            (f"[{name}]" if ":" in name else name) + (f":{p}" if p is not None else suffix)
            for name, p in sorted(self.hosts, key=lambda item: (item[0], item[1] or 0))
        )
        shown = "".join(ch for ch in value if ch.isprintable())[:100]
        return (
            f"this server answers requests addressed to {names} only, not to {shown!r} (a "
            "protection against DNS rebinding); open the page at one of those addresses "
            "(the server's --allow-host option adds others)"
        )


def _origin_message(origin: str | None, served: str | None) -> str:
    own = f" ({served})" if served else ""
    source = repr("".join(ch for ch in origin if ch.isprintable())[:100]) if origin else None
    source = f"not from {source}" if source else "not from another site"
    return (
        f"cross-origin request refused: this server accepts requests from its own page{own} "
        f"only, {source}; its --allow-origin option opens it to another page"
    )


def _headers(scope: Scope) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        key = name.decode("latin-1").lower()
        if key in ("host", "origin", "sec-fetch-site") and key not in found:
            found[key] = value.decode("latin-1")
    return found


def _served_port(scope: Scope) -> int | None:
    server = scope.get("server")
    if server and len(server) >= 2 and isinstance(server[1], int):
        return server[1]
    return None
