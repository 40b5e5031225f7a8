"""Read a running supervisord's program settings over XML-RPC (stdlib only).

``supervisor.getAllConfigInfo`` reports, per process, the values supervisord actually
loaded (``stopwaitsecs``, ``stopsignal``, ``command``), so a check against it also catches
a config file edited but never ``reread``.
"""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from typing import Any
from urllib.parse import urlsplit

from ..urls import mask_url

_TIMEOUT = 10.0


class SupervisordError(Exception):
    """The supervisord could not be asked; the message names the masked URL."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=_TIMEOUT)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(_TIMEOUT)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _Transport(xmlrpc.client.Transport):
    """HTTP with a timeout, or HTTP over a unix socket when ``socket_path`` is given."""

    def __init__(self, socket_path: str | None = None) -> None:
        super().__init__()
        self._socket_path = socket_path

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._socket_path is not None:
            return _UnixConnection(self._socket_path)
        chost, self._extra_headers, _ = self.get_host_info(host)
        return http.client.HTTPConnection(chost, timeout=_TIMEOUT)


def read_config_info(url: str) -> list[dict[str, Any]]:
    """``supervisor.getAllConfigInfo()`` of the supervisord at ``url``.

    ``url`` is ``http://[user:pass@]host:port[/RPC2]`` (an ``[inet_http_server]``) or
    ``unix:///path/to/supervisor.sock`` (a ``[unix_http_server]``).
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        proxy = xmlrpc.client.ServerProxy(
            "http://localhost/RPC2", transport=_Transport(parts.path or parts.netloc)
        )
    elif parts.scheme in ("http", "https"):
        target = url if parts.path not in ("", "/") else url.rstrip("/") + "/RPC2"
        proxy = xmlrpc.client.ServerProxy(target, transport=_Transport())
    else:
        raise SupervisordError(
            f"supervisord URL {mask_url(url)!r}: use http://host:9001 or unix:///path.sock"
        )
    try:
        with proxy:
            infos = proxy.supervisor.getAllConfigInfo()
    except xmlrpc.client.Fault as exc:
        raise SupervisordError(
            f"supervisord at {mask_url(url)} refused getAllConfigInfo: {exc.faultString}"
        ) from None
    except (OSError, xmlrpc.client.Error, http.client.HTTPException) as exc:
        raise SupervisordError(f"cannot ask supervisord at {mask_url(url)}: {exc}") from None
    if not isinstance(infos, list):
        raise SupervisordError(f"supervisord at {mask_url(url)} sent {type(infos).__name__}")
    return [info for info in infos if isinstance(info, dict)]
