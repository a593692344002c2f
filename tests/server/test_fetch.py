"""Remote media fetching (--allow-remote-media): SSRF refusals, timeouts, size cap, redirects.

Everything runs against an HTTP server on 127.0.0.1. The default address policy must refuse it;
the other tests give the fetcher a policy that allows exactly 127.0.0.1 (a fetcher attribute, not
a server option).
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from thinktalk.server.fetch import RemoteFetcher, is_public_address
from thinktalk.server.media import MediaLimits, load_url, media_policy
from thinktalk.server.protocol import APIError

BODY = b"\x89PNG-not-really" * 100
LOOPBACK = ipaddress.ip_address("127.0.0.1")


class _Handler(BaseHTTPRequestHandler):
    hits: list[tuple[str, str]] = []  # (path, Host header)

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self.hits.append((self.path, self.headers.get("Host", "")))
        port = self.server.server_address[1]
        route = self.path.split("?")[0]
        if route == "/img":
            self._send(200, BODY)
        elif route == "/empty":
            self._send(200, b"")
        elif route == "/big":  # no Content-Length: counted while read
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"x" * 1024)
        elif route == "/big-declared":  # refused from its header
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self.wfile.write(b"x" * 10)
        elif route == "/slow":  # headers only after longer than the read timeout
            time.sleep(1.5)
            self._send(200, BODY)
        elif route == "/trickle":  # one byte every 0.2 s, each within the read timeout, never ending
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif route == "/missing":
            self._send(404, b"no")
        elif route.startswith("/to/"):  # /to/<where>: a redirect
            where = {"img": "/img", "private": "http://10.0.0.1/img", "metadata": "http://169.254.169.254/latest",
                     "other-loopback": f"http://127.0.0.2:{port}/img", "v6": f"http://[::1]:{port}/img",
                     "file": "file:///etc/passwd", "self": "/to/self", "none": ""}[route[4:]]
            self.send_response(302)
            if where:
                self.send_header("Location", where)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"?")

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _clear_hits():
    _Handler.hits.clear()


def loopback_fetcher(**kw) -> RemoteFetcher:
    kw.setdefault("max_bytes", 16 * 1024)
    return RemoteFetcher(address_allowed=lambda ip: ip == LOOPBACK, **kw)


def refused(fetcher: RemoteFetcher, url: str) -> APIError:
    with pytest.raises(APIError) as info:
        fetcher.fetch_blocking(url, "messages.0.content.0.image_url")
    err = info.value
    assert err.status == 400 and err.param == "messages.0.content.0.image_url"
    return err


# -- the address policy ----------------------------------------------------------------------------
@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.5.6.7", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "0.0.0.0", "100.64.0.1",
    "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.2.1", "198.18.0.1",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "fec0::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
    "2002:7f00:1::1",  # 6to4 carrying 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 carrying 169.254.169.254
    "64:ff9b::a00:1",  # NAT64 carrying 10.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo whose client is 10.0.0.1 (obfuscated)
])
def test_non_public_addresses_are_refused(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001::1"])
def test_public_addresses_are_allowed(address):
    assert is_public_address(ipaddress.ip_address(address))


# -- SSRF: the default policy ----------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "{origin}/img", "http://localhost:{port}/img", "http://127.1:{port}/img", "http://2130706433:{port}/img",
    "http://0x7f000001:{port}/img", "http://[::1]:{port}/img", "http://[::ffff:127.0.0.1]:{port}/img",
    "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x.png", "http://[fe80::1%25lo]/x",
])
def test_default_policy_refuses_loopback_and_private_hosts(origin, url):
    port = origin.rsplit(":", 1)[1]
    fetcher = RemoteFetcher(max_bytes=1024, connect_timeout_s=1, total_timeout_s=3)
    err = refused(fetcher, url.format(origin=origin, port=port))
    assert err.code == "media_url_forbidden", err.message
    assert _Handler.hits == []  # refused before connecting


def test_server_policy_refuses_loopback_through_load_url(origin):
    policy = media_policy(allow_remote=True)
    with pytest.raises(APIError) as info:
        asyncio.run(load_url(f"{origin}/img", policy, "p"))
    assert info.value.code == "media_url_forbidden" and _Handler.hits == []
    with pytest.raises(APIError) as info:  # and off by default
        asyncio.run(load_url(f"{origin}/img", media_policy(), "p"))
    assert info.value.code == "remote_media_disabled"


def test_any_refused_address_refuses_the_host():
    fetcher = RemoteFetcher(max_bytes=1024, resolve=lambda host, port: ["93.184.216.34", "127.0.0.1"])
    assert refused(fetcher, "http://mixed.test/x").code == "media_url_forbidden"


# -- what a fetch may do ---------------------------------------------------------------------------
def test_fetch_connects_to_the_checked_address(origin):
    port = int(origin.rsplit(":", 1)[1])
    calls = []

    def resolve(host, p):
        calls.append((host, p))
        return ["127.0.0.1"]  # a name only this resolver knows: the connection must use its answer

    fetcher = loopback_fetcher(resolve=resolve)
    assert fetcher.fetch_blocking(f"http://media.test:{port}/img?a=1", "p") == BODY
    assert calls == [("media.test", port)]  # resolved once, then connected to what was checked
    assert _Handler.hits == [("/img?a=1", f"media.test:{port}")]


def test_fetch_through_a_media_policy(origin):
    limits = MediaLimits(max_bytes=16 * 1024)
    policy = media_policy(limits=limits)
    policy.fetcher = loopback_fetcher(max_bytes=limits.max_bytes)
    assert asyncio.run(load_url(f"{origin}/img", policy, "p")) == BODY


def test_size_cap_while_streaming_and_from_the_header(origin):
    fetcher = loopback_fetcher(max_bytes=16 * 1024)
    assert refused(fetcher, f"{origin}/big").code == "media_too_large"
    t0 = time.monotonic()
    assert refused(fetcher, f"{origin}/big-declared").code == "media_too_large"
    assert time.monotonic() - t0 < 2


def test_timeouts(origin):
    err = refused(loopback_fetcher(read_timeout_s=0.3, total_timeout_s=5), f"{origin}/slow")
    assert err.code == "media_fetch_failed" and "timed out" in err.message
    t0 = time.monotonic()
    err = refused(loopback_fetcher(read_timeout_s=1, total_timeout_s=1.0), f"{origin}/trickle")
    assert err.code == "media_fetch_failed" and "longer than" in err.message
    assert time.monotonic() - t0 < 3


def test_redirects_are_rechecked_and_bounded(origin):
    fetcher = loopback_fetcher()
    assert fetcher.fetch_blocking(f"{origin}/to/img", "p") == BODY
    for where in ("private", "metadata", "other-loopback", "v6"):
        _Handler.hits.clear()
        err = refused(fetcher, f"{origin}/to/{where}")
        assert err.code == "media_url_forbidden", (where, err.message)
        assert [h[0] for h in _Handler.hits] == [f"/to/{where}"]  # the target was never asked
    assert refused(fetcher, f"{origin}/to/file").code == "invalid_media_url"
    err = refused(fetcher, f"{origin}/to/self")
    assert "more than 5 redirects" in err.message and len(_Handler.hits) >= 6
    assert "without a Location" in refused(fetcher, f"{origin}/to/none").message


def test_http_errors_and_empty_bodies(origin):
    fetcher = loopback_fetcher()
    assert "HTTP 404" in refused(fetcher, f"{origin}/missing").message
    assert "empty" in refused(fetcher, f"{origin}/empty").message
    closed = f"http://127.0.0.1:{_free_port()}/x"
    assert refused(loopback_fetcher(connect_timeout_s=1), closed).code == "media_fetch_failed"


@pytest.mark.parametrize("url", [
    "ftp://example.com/a.png", "file:///etc/passwd", "gopher://example.com/", "javascript:alert(1)",
    "http:///nohost", "http://user:pw@example.com/a.png", "http://example.com:99999/a.png",
])
def test_only_plain_http_urls(url):
    fetcher = RemoteFetcher(max_bytes=1024, resolve=lambda h, p: pytest.fail("must not resolve"))
    assert refused(fetcher, url).code == "invalid_media_url"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
