"""HTTP to one endpoint, for the listing and the file engine alike: one place that adds the token (only where
the endpoint decision allows it) and checks every redirect hop before it is followed: a malformed or non-http
``Location`` and a target the endpoint's guard refuses end the request with exit 8 before any connection to
it; more than MAX_REDIRECTS hops is a redirect loop (requests.TooManyRedirects, retried like a network error).

huggingface_hub's HfApi follows redirects with a process-wide httpx client we cannot hook without changing it
for every other user in the process (ComfyUI), so the listing goes through these sessions too.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from qwen_core.download.types import EXIT_UNSAFE, Endpoint, HttpConfig
from qwen_core.errors import DownloadError, QwenError

USER_AGENT = "qwen-image-robust-download/0.1"
MAX_REDIRECTS = 10  # the Hub needs 1-2 (resolve -> CDN); requests' default of 30 only delays a loop's end


class HubClient:
    """Per-thread ``requests`` sessions (a Session is not thread-safe) bound to one ``Endpoint``."""

    def __init__(self, endpoint: Endpoint, token: str | None, config: HttpConfig) -> None:
        self.endpoint = endpoint
        self.config = config
        self._token = token if endpoint.send_token else None
        self._local = threading.local()

    def __repr__(self) -> str:  # never the token, also not in a traceback's locals
        return f"HubClient({self.endpoint.url!r}, token={'yes' if self._token else 'no'})"

    @property
    def token(self) -> str | None:
        """The token requests to this endpoint carry (None: anonymous); for huggingface_hub calls (xet)."""
        return self._token

    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.headers["User-Agent"] = USER_AGENT
            s.max_redirects = MAX_REDIRECTS
            s.hooks["response"].append(self._check_redirect)
        return s

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def timeout(self) -> tuple[float, float]:
        return self.config.connect_timeout, self.config.read_timeout

    def check_url(self, url: str, came_from: str) -> None:
        """Raise DownloadError (EXIT_UNSAFE) when the endpoint's guard refuses ``url``."""
        guard = self.endpoint.redirect_guard
        if guard is None:
            return
        try:
            guard(url)
        except QwenError as err:
            raise DownloadError(f"{came_from.split('?')[0]} redirected to a refused address: {err}",
                                fix="Use a mirror that serves files itself, or set it in HF_ENDPOINT.",
                                exit_code=EXIT_UNSAFE) from err

    def _check_redirect(self, resp: requests.Response, *args: Any, **kwargs: Any) -> None:
        # requests runs response hooks on every hop, before following it: refuse the hop, not its answer.
        if resp.is_redirect:
            try:
                target = redirect_target(resp.url, resp.headers.get("Location", ""), self.endpoint.host)
                self.check_url(target, resp.url)
            except DownloadError:
                resp.close()
                raise


def redirect_target(from_url: str, location: str, host: str) -> str:
    """The absolute http(s) URL a ``Location`` header points to; DownloadError (exit 8) when it is malformed or
    not http(s) (``file:``, ``ftp:``, ``javascript:`` ...)."""
    shown = location if len(location) <= 200 else location[:200] + "..."
    try:
        if any(ord(ch) < 33 for ch in location):
            raise ValueError("spaces or control characters")
        target = urljoin(from_url, location)
        parts = urlsplit(target)
        _ = parts.port  # raises ValueError for a port that is not a number in range
        if parts.scheme in ("http", "https") and not parts.hostname:
            raise ValueError("no host")
    except ValueError as err:
        raise DownloadError(f"{host} answered a malformed redirect (Location: {shown!r}: {err}).",
                            fix="Use another endpoint/mirror; this one's redirects are broken.",
                            exit_code=EXIT_UNSAFE) from err
    if parts.scheme not in ("http", "https"):
        raise DownloadError(f"{host} redirected to a non-http address ({shown!r}); refused.",
                            fix="Use another endpoint/mirror; a Hub only redirects to http(s).", exit_code=EXIT_UNSAFE)
    return target
