"""URL helpers: secrets never reach a log line, an error message, a page or a repr.

:func:`mask_url` is the one function every place that shows a URL goes through.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

MASK = "***"
#: A query parameter whose name contains one of these carries a secret (``password=``,
#: ``auth_token=``, ``api_key=``, ``client_secret=``, ``pwd=``).
_SECRET_NAMES = re.compile(r"pass|pwd|secret|token|key", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with every credential replaced by ``***``; everything else is kept.

    Masked: the password of the userinfo (``redis://user:pw@host``), the value of any query
    parameter whose name contains pass, pwd, secret, token or key (``?password=pw``), and
    the same inside a URL given as a query parameter (``amqp://...?task_store=redis://:pw@h``).
    A URL that cannot be parsed is not shown at all.
    """
    try:
        parts = urlsplit(url)
        netloc = _mask_netloc(parts.netloc)
        query = _mask_query(parts.query)
    except ValueError:
        return "<unparseable url>"
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # as written: urlunsplit would drop the empty "//" of sqlite:///path
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _mask_netloc(netloc: str) -> str:
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return netloc
    user, colon, _password = userinfo.partition(":")
    return f"{user}:{MASK}@{hostport}" if colon else netloc


def _mask_query(query: str) -> str:
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    masked = [(name, _mask_value(name, value)) for name, value in pairs]
    if masked == pairs:
        return query
    return "&".join(
        f"{quote(name, safe='')}={quote(value, safe=':/@*?=')}" for name, value in masked
    )


def _mask_value(name: str, value: str) -> str:
    if value and _SECRET_NAMES.search(name):
        return MASK
    return mask_url(value) if "://" in value else value
