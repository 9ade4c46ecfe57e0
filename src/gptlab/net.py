"""The one HTTP client: GET, range GET and streamed downloads, each retried with backoff.

Everything gptlab fetches goes through here: streamed token shards and their listings
(gptlab.data.stream, gptlab.data.remote) and the pinned downloads (gptlab.downloads: HellaSwag,
tinyshakespeare). Failures (unreachable host, HTTP errors, truncated or corrupt bodies, socket
timeouts) are retried with exponential backoff, then become one UserError; nothing waits without
a timeout. Redirects are followed, without the Authorization header when they lead to another host.
No torch here.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from gptlab.errors import UserError


@dataclass(frozen=True)
class Retry:
    """How hard to try: attempts per request, first backoff (doubling, capped at 30 s), socket timeout."""

    attempts: int = 5
    backoff: float = 1.0
    timeout: float = 30.0

    @classmethod
    def from_env(cls) -> "Retry":
        """Defaults, overridden by $GPTLAB_STREAM_RETRIES, $GPTLAB_STREAM_BACKOFF, $GPTLAB_STREAM_TIMEOUT."""
        env = os.environ
        try:
            return cls(attempts=max(1, int(env.get("GPTLAB_STREAM_RETRIES", cls.attempts))),
                       backoff=float(env.get("GPTLAB_STREAM_BACKOFF", cls.backoff)),
                       timeout=float(env.get("GPTLAB_STREAM_TIMEOUT", cls.timeout)))
        except ValueError as e:
            raise UserError(f"$GPTLAB_STREAM_*: {e}") from None

    def delays(self) -> Iterator[float]:
        """The pause before each attempt: 0, then backoff, 2*backoff, ..."""
        yield 0.0
        for i in range(self.attempts - 1):
            yield min(30.0, self.backoff * 2**i)


class Stopped(Exception):
    """The caller's stop event was set while a request was under way (or waiting to be retried)."""


class _KeepAuthOnSameHost(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but drop the Authorization header when one leads to another host (a CDN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_KeepAuthOnSameHost())


def describe(e: BaseException, timeout: float) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        reason = e.reason
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout:g} s"
        return f"cannot connect ({getattr(reason, 'strerror', None) or reason})"
    if isinstance(e, TimeoutError):
        return f"no data within {timeout:g} s"
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, http.client.IncompleteRead):
        return f"connection closed early ({len(e.partial)} bytes read)"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def with_retries(what: str, fn: Callable[[], Any], retry: Retry, stop: threading.Event | None = None) -> Any:
    """fn() until it succeeds; network and verification errors are retried with backoff, then
    become one UserError naming `what`."""
    last = ""
    for delay in retry.delays():
        if delay and (stop.wait(delay) if stop is not None else time.sleep(delay)):
            raise Stopped
        try:
            return fn()
        except Stopped:
            raise
        except (OSError, http.client.HTTPException, UserError, ValueError) as e:
            last = describe(e, retry.timeout)
    raise UserError(f"{what}: {last} (gave up after {retry.attempts} attempts)")


def open_url(url: str, headers: dict[str, str], timeout: float, byte_range: tuple[int, int] | None = None):
    """One GET (of bytes [start, end) with a range), following redirects; not retried: run it
    inside with_retries."""
    req = urllib.request.Request(url, headers=dict(headers))
    if byte_range is not None:
        req.add_header("Range", f"bytes={byte_range[0]}-{byte_range[1] - 1}")
    return _OPENER.open(req, timeout=timeout)


def fetch_bytes(url: str, headers: dict[str, str], retry: Retry, limit: int | None = None) -> bytes:
    """The body of url (its first `limit` bytes, asked for with a range request)."""
    def once() -> bytes:
        with open_url(url, headers, retry.timeout, None if limit is None else (0, limit)) as r:
            body = r.read() if limit is None else r.read(limit)
        if limit is not None and len(body) < limit:
            raise UserError(f"only {len(body)} of the first {limit} bytes came back")
        return body
    return with_retries(url, once, retry)


def read_into(url: str, headers: dict[str, str], timeout: float, sink: Callable[[bytes], Any], *,
              stop: threading.Event | None = None, on_length: Callable[[int | None], Any] | None = None,
              block: int = 1 << 18) -> int:
    """One GET of url, its body fed to sink block by block; returns the bytes read. on_length gets
    the Content-Length (None when absent) before the first block. Not retried: run it inside
    with_retries with a sink that starts over."""
    seen = 0
    with open_url(url, headers, timeout) as r:
        if on_length is not None:
            on_length(int(r.headers.get("Content-Length") or 0) or None)
        while chunk := r.read(block):
            if stop is not None and stop.is_set():
                raise Stopped
            sink(chunk)
            seen += len(chunk)
    return seen
