"""Fetching media from http(s) URLs a client sent (``--allow-remote-media``) without letting the
client reach what only the server can reach (SSRF).

- http and https only; no credentials in the URL.
- The host is resolved once per hop and every address it resolves to must be public: loopback,
  private, link-local (cloud metadata at 169.254.169.254), multicast, reserved and unspecified
  addresses are refused, IPv4 and IPv6 alike, including IPv4 addresses carried inside IPv6 ones
  (mapped ``::ffff:a.b.c.d``, 6to4, Teredo, NAT64). If any address is refused the URL is.
- The connection goes to an address that was checked (TLS still verifies the certificate against
  the host name), so a DNS answer that changes between check and connect cannot swap it.
- Redirects are followed by hand, at most `max_redirects`, and each new URL is checked as the first.
- Connect and read timeouts per socket operation, and one deadline for the whole fetch that closes
  the socket when it passes (a server trickling bytes cannot hold a worker thread for long).
- At most `max_bytes`: a larger Content-Length is refused before reading, and the body is counted
  while it streams in. Bodies are asked for without compression, and never decompressed.

The address policy and the resolver are attributes of the fetcher so that tests can fetch from a
loopback server; the server itself always uses the defaults.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Union

from .protocol import APIError, bad_request

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CHUNK = 64 * 1024


def is_public_address(ip: IPAddress) -> bool:
    """Whether a fetch may connect to `ip`: a global unicast address, also for the IPv4 address
    an IPv6 one carries."""
    if ip.version == 6:
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(v4 is not None and not is_public_address(v4) for v4 in embedded):
            return False
        if ip.is_site_local:
            return False
    refused = (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
               or ip.is_unspecified)
    return not refused and ip.is_global


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (an address literal resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass
class _Target:
    url: str
    scheme: str
    host: str  # IDNA-encoded, no brackets
    port: int
    path: str  # path and query, quoted


def _fetch_error(message: str, param: str, code: str = "media_fetch_failed") -> APIError:
    return bad_request(message, param=param, code=code)


def _shown(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."


def parse_target(url: str, param: str) -> _Target:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _fetch_error(f"malformed media URL {_shown(url)!r}: {exc}", param, "invalid_media_url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _fetch_error(f"only http and https media URLs are fetched, not {scheme or 'no scheme'!r}", param,
                           "invalid_media_url")
    if parts.username is not None or parts.password is not None:
        raise _fetch_error("media URLs with credentials are not fetched", param, "invalid_media_url")
    host = (parts.hostname or "").split("%", 1)[0]  # (an IPv6 zone id names an interface: never public)
    if not host:
        raise _fetch_error(f"media URL {_shown(url)!r} has no host", param, "invalid_media_url")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise _fetch_error(f"media URL host {parts.hostname!r} is not a valid host name", param,
                           "invalid_media_url") from None
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return _Target(url, scheme, host, port or (443 if scheme == "https" else 80), path)


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to `ip` for the URL's host name (Host header from the name)."""

    def __init__(self, host: str, port: int, ip: str, timeout: float, read_timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ip, self.read_timeout = ip, read_timeout

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        sock.settimeout(self.read_timeout)
        return sock

    def connect(self) -> None:
        self.sock = self._open()


class _PinnedHTTPS(_PinnedHTTP):
    default_port = 443

    def __init__(self, host: str, port: int, ip: str, timeout: float, read_timeout: float,
                 context: ssl.SSLContext):
        super().__init__(host, port, ip, timeout, read_timeout)
        self.context = context

    def connect(self) -> None:
        self.sock = self.context.wrap_socket(self._open(), server_hostname=self.host)


@dataclass
class RemoteFetcher:
    """Fetches one media URL by the rules in the module docstring; errors are 400s naming `param`."""

    max_bytes: int
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # per socket read
    total_timeout_s: float = 30.0  # the whole fetch, redirects included
    max_redirects: int = 5
    address_allowed: Callable[[IPAddress], bool] = is_public_address
    resolve: Callable[[str, int], list[str]] = resolve_host
    tls: ssl.SSLContext | None = field(default=None, repr=False)  # None: the system's trusted CAs

    async def fetch(self, url: str, param: str) -> bytes:
        # blocking sockets in a worker thread; the deadline bounds how long the thread stays busy
        return await asyncio.to_thread(self.fetch_blocking, url, param)

    def fetch_blocking(self, url: str, param: str) -> bytes:
        deadline = time.monotonic() + self.total_timeout_s
        for _ in range(self.max_redirects + 1):
            target = parse_target(url, param)
            ips = self.checked_addresses(target, param)
            status, location, body = self._get(target, ips, deadline, param)
            if status in REDIRECTS:
                if not location:
                    raise _fetch_error(f"{_shown(target.url)!r} redirects (HTTP {status}) without a Location",
                                       param)
                url = urllib.parse.urljoin(target.url, location)
                continue
            if status != 200:
                raise _fetch_error(f"fetching {_shown(target.url)!r} gave HTTP {status}", param)
            if not body:
                raise _fetch_error(f"{_shown(target.url)!r} is empty", param)
            return body
        raise _fetch_error(f"more than {self.max_redirects} redirects fetching {_shown(url)!r}", param)

    def checked_addresses(self, target: _Target, param: str) -> list[str]:
        try:
            found = self.resolve(target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise _fetch_error(f"cannot resolve {target.host!r}: {getattr(exc, 'strerror', None) or exc}",
                               param) from None
        if not found:
            raise _fetch_error(f"cannot resolve {target.host!r}", param)
        for text in found:
            try:
                ip = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                raise _fetch_error(f"{target.host!r} resolved to {text!r}, not an address", param) from None
            if not self.address_allowed(ip):
                raise _fetch_error(
                    f"media URL host {target.host!r} is (or resolves to) {ip}, which is not a public address; "
                    f"only public addresses are fetched", param, "media_url_forbidden")
        return found

    def _connection(self, target: _Target, ip: str) -> _PinnedHTTP:
        if target.scheme == "https":
            context = self.tls or ssl.create_default_context()
            return _PinnedHTTPS(target.host, target.port, ip, self.connect_timeout_s, self.read_timeout_s, context)
        return _PinnedHTTP(target.host, target.port, ip, self.connect_timeout_s, self.read_timeout_s)

    def _get(self, target: _Target, ips: list[str], deadline: float, param: str) -> tuple[int, str | None, bytes]:
        """(status, Location, body) of one GET; the body only for a 200."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _fetch_error(f"fetching {_shown(target.url)!r} took longer than {self.total_timeout_s:g} s", param)
        errors: list[str] = []
        for ip in ips:
            conn = self._connection(target, ip)
            # past the deadline the socket is shut down, which ends any read blocked on it
            timer = threading.Timer(remaining, _shut, (conn,))
            timer.daemon = True
            timer.start()
            try:
                try:
                    conn.connect()
                except OSError as exc:
                    errors.append(f"{ip}: {_reason(exc)}")
                    continue
                return self._exchange(conn, target, deadline, param)
            except (OSError, http.client.HTTPException) as exc:
                if time.monotonic() >= deadline:
                    raise _fetch_error(f"fetching {_shown(target.url)!r} took longer than "
                                       f"{self.total_timeout_s:g} s", param) from None
                raise _fetch_error(f"cannot fetch {_shown(target.url)!r}: {_reason(exc)}", param) from None
            finally:
                timer.cancel()
                conn.close()
        raise _fetch_error(f"cannot connect to {target.host!r} ({'; '.join(errors)})", param)

    def _exchange(self, conn: _PinnedHTTP, target: _Target, deadline: float, param: str) -> tuple[int, str | None, bytes]:
        conn.request("GET", target.path, headers={
            "User-Agent": "thinktalk-media-fetch", "Accept": "*/*", "Accept-Encoding": "identity", "Connection": "close"})
        resp = conn.getresponse()
        if resp.status in REDIRECTS:
            return resp.status, resp.getheader("Location"), b""
        if resp.status != 200:
            return resp.status, None, b""
        declared = resp.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise _too_large(target, self.max_bytes, param)
        chunks: list[bytes] = []
        size = 0
        while True:
            if time.monotonic() >= deadline:
                raise _fetch_error(f"fetching {_shown(target.url)!r} took longer than {self.total_timeout_s:g} s",
                                   param)
            chunk = resp.read1(_CHUNK)
            if not chunk:
                if time.monotonic() >= deadline:  # (the deadline's shutdown reads as the end of the body)
                    raise _fetch_error(f"fetching {_shown(target.url)!r} took longer than "
                                       f"{self.total_timeout_s:g} s", param)
                break
            size += len(chunk)
            if size > self.max_bytes:
                raise _too_large(target, self.max_bytes, param)
            chunks.append(chunk)
        return 200, None, b"".join(chunks)


def _too_large(target: _Target, limit: int, param: str) -> APIError:
    return _fetch_error(f"{_shown(target.url)!r} is larger than the media limit ({limit} bytes)", param,
                        "media_too_large")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or exc})"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _shut(conn: _PinnedHTTP) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
