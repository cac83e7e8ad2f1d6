"""API keys: read from the environment only, and scrubbed from anything we store or print.

A key is never a command-line option (it would show in `ps` and shell history), never part of
a stored request, and `redact` removes it from error messages and response bodies before they
reach the warehouse or the terminal: a misbehaving server may echo request headers back.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

KEY_ENV = ("FACTORY_TEACHER_API_KEY", "OPENAI_API_KEY")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
_USERINFO = re.compile(r"(//)[^/@\s]+@")


def api_key() -> str | None:
    for name in KEY_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def redact(text: str | None, key: str | None = None) -> str | None:
    """`text` with the API key, any bearer token and any URL user:password replaced by ***."""
    if not text:
        return text
    key = key if key is not None else api_key()
    if key:
        text = text.replace(key, "***")
    return _USERINFO.sub(r"\1***@", _BEARER.sub(r"\1***", text))


def safe_url(url: str | None) -> str | None:
    """A URL without user:password@ (it is stored in job parameters and printed)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts)
