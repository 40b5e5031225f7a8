"""URL helpers: secrets never reach a log line or an error message."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``; other parts are kept.

    A URL in the query string (``amqp://...?task_store=redis://:pw@host``) is masked too,
    and so is every query parameter whose name says password (``?sentinel_password=...``).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    query = _mask_query(parts.query)
    if parts.password is None:  # keep the text as written (urlunsplit drops an empty "//")
        return url if query == parts.query else url.replace(f"?{parts.query}", f"?{query}", 1)
    user = parts.username or ""
    # Host and port as written: a bad port must not turn masking into an error.
    netloc = f"{user}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _mask_query(query: str) -> str:
    if "://" not in query and "password" not in query.lower():
        return query
    pairs = query_pairs(query)
    masked = [(key, _mask_value(key, value)) for key, value in pairs]
    return query if masked == pairs else urlencode(masked, safe=":/@*,=+?")


def _mask_value(key: str, value: str) -> str:
    if "password" in key.lower():
        return "***"
    return mask_url(value) if "://" in value else value


def query_pairs(query: str) -> list[tuple[str, str]]:
    """The parameters of a query string, with ``+`` kept as written.

    ``parse_qsl`` reads ``+`` as a space, which would turn a nested
    ``task_store=redis+cluster://...`` into ``redis cluster://``; a URL's query here never
    means a space by ``+``.
    """
    return parse_qsl(query.replace("+", "%2B"), keep_blank_values=True)
