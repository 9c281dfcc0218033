"""Which download endpoints a shared workflow may point at (the SSRF policy, in one place).

A workflow is data other people send you. A URL widget in it could make your machine fetch from hosts on
your own network (router admin pages, cloud metadata at 169.254.169.254, services on localhost). So an
endpoint typed into a workflow must be http(s), carries no credentials, and may not resolve to a
loopback, private, link-local or otherwise non-public address, unless the user configured that very
host themselves in the environment (HF_ENDPOINT), which is how a local mirror is meant to be set up.
The user's Hub token goes only to HF_ENDPOINT's host or huggingface.co: a host named by the workflow alone
gets anonymous requests, or a shared workflow could collect tokens.
The CLI's ``--endpoint`` is typed by the user and does not need this check.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from qwen_core.errors import InvalidInputError

DEFAULT_ENDPOINT = "https://huggingface.co"
FIX = (
    "Leave the endpoint empty to use HF_ENDPOINT (or huggingface.co), or set HF_ENDPOINT to this mirror in "
    "the environment that starts ComfyUI if you run it yourself."
)

Resolver = Callable[[str, int], list[str]]


@dataclass(frozen=True)
class EndpointDecision:
    """The endpoint a download will use, where it came from, and a line for the node's report."""

    url: str
    source: str  # "workflow", "env" or "default"
    message: str
    send_token: bool = True  # False for a host only the workflow names: the download runs anonymously
    # True when only the public-address check let this endpoint in: its redirects must pass the same check
    # (a public host could otherwise 302 the download to 169.254.169.254 or the LAN).
    public_only: bool = False

    def redirect_guard(self) -> Callable[[str], None] | None:
        """What the downloader must call on each redirect target, or None when the user configured the host."""
        return ensure_public_host if self.public_only else None


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return sorted({info[4][0] for info in infos})


def _host_port(url: str, field: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidInputError(field, f"{url!r} must start with http:// or https://.", fix=FIX)
    if parts.username is not None or parts.password is not None:
        # Credentials in a widget would travel inside the workflow JSON and the PNG metadata.
        raise InvalidInputError(field, "must not contain a user name or password.", fix="Use HF_TOKEN.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise InvalidInputError(field, f"{url!r} has an invalid port.", fix=FIX) from err
    if not parts.hostname:
        raise InvalidInputError(field, f"{url!r} has no host name.", fix=FIX)
    return parts.hostname.lower().rstrip("."), port


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_endpoint(
    endpoint: str | None,
    *,
    env: Mapping[str, str] | None = None,
    resolver: Resolver | None = None,
    field: str = "endpoint",
) -> EndpointDecision:
    """Accept or refuse a download endpoint that came from a workflow widget.

    Empty means "use HF_ENDPOINT, else huggingface.co". Raises InvalidInputError naming ``field``.
    """
    env = os.environ if env is None else env
    configured = (env.get("HF_ENDPOINT") or "").strip().rstrip("/")
    value = (endpoint or "").strip().rstrip("/")
    if not value:
        if configured:
            return EndpointDecision(configured, "env", f"Endpoint: {configured} (from HF_ENDPOINT)")
        return EndpointDecision(DEFAULT_ENDPOINT, "default", f"Endpoint: {DEFAULT_ENDPOINT}")
    if any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise InvalidInputError(field, "must not contain spaces or control characters.", fix=FIX)
    host, port = _host_port(value, field)
    if configured and _host_port(configured, "HF_ENDPOINT") == (host, port):
        return EndpointDecision(value, "workflow", f"Endpoint: {value} (workflow; same host as HF_ENDPOINT)")
    token_home = _host_port(DEFAULT_ENDPOINT, "endpoint") == (host, port)
    ensure_public_host(value, resolver=resolver, field=field)
    note = "" if token_home else "; no token sent"
    return EndpointDecision(value, "workflow", f"Endpoint: {value} (from the workflow{note})", send_token=token_home,
                            public_only=True)


def ensure_public_host(url: str, *, resolver: Resolver | None = None, field: str = "endpoint") -> None:
    """Raise InvalidInputError unless every address of ``url``'s host is public (not loopback, private,
    link-local or reserved). Used for a workflow's endpoint and for every redirect it answers with."""
    host, port = _host_port(url, field)
    try:
        addresses = (resolver or _resolve)(host, port)
    except OSError as err:
        raise InvalidInputError(field, f"host {host!r} cannot be resolved ({err}).", fix=FIX) from err
    blocked = [a for a in addresses if not _is_public(a)]
    if not addresses or blocked:
        shown = ", ".join(blocked) or "no address"
        raise InvalidInputError(
            field,
            f"{url!r} resolves to a non-public (loopback, private, link-local or reserved) address ({shown}); a workflow "
            "may only name such a host when the same host is configured in HF_ENDPOINT.",
            fix=FIX,
        )
