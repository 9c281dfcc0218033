"""The one place an ``Endpoint`` is decided: from the node's field, the CLI flag / a caller, or HF_ENDPOINT.

A workflow is data other people send you. A URL widget in it could make your machine fetch from hosts on
your own network (router admin pages, cloud metadata at 169.254.169.254, services on localhost). So an
endpoint typed into a workflow must be http(s), carries no credentials, and may not resolve to a
loopback, private, link-local or otherwise non-public address, unless the user configured that very
host themselves in the environment (HF_ENDPOINT), which is how a local mirror is meant to be set up; its
redirects (file downloads and the repo listing alike) must pass the same check.
The user's Hub token goes only to HF_ENDPOINT's host or huggingface.co: a host named by the workflow alone
gets anonymous requests, or a shared workflow could collect tokens.
The CLI's ``--endpoint`` is typed by the user and does not need the address check.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

from qwen_core.download.types import Endpoint, EndpointSource, Resolver
from qwen_core.errors import InvalidInputError

DEFAULT_ENDPOINT = "https://huggingface.co"
FIX = (
    "Leave the endpoint empty to use HF_ENDPOINT (or huggingface.co), or set HF_ENDPOINT to this mirror in "
    "the environment that starts ComfyUI if you run it yourself."
)


def resolve_endpoint(
    value: str | None = None,
    *,
    source: EndpointSource | str = EndpointSource.USER,
    env: Mapping[str, str] | None = None,
    resolver: Resolver | None = None,
    field: str = "endpoint",
) -> Endpoint:
    """The endpoint a download will use. Empty means "HF_ENDPOINT, else huggingface.co".

    ``source`` says who typed ``value``: ``"workflow"`` (the Downloader node's field: checked against the
    address policy above) or ``"user"`` (the CLI's --endpoint, a library caller). Raises InvalidInputError
    naming ``field``.
    """
    source = EndpointSource(source)
    env = os.environ if env is None else env
    configured = (env.get("HF_ENDPOINT") or "").strip().rstrip("/")
    value = (value or "").strip().rstrip("/")
    if not value:
        if configured:
            host_port(configured, "HF_ENDPOINT")
            return Endpoint(configured, EndpointSource.ENV, f"Endpoint: {configured} (from HF_ENDPOINT)")
        return Endpoint(DEFAULT_ENDPOINT, EndpointSource.DEFAULT, f"Endpoint: {DEFAULT_ENDPOINT}")
    if any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise InvalidInputError(field, "must not contain spaces or control characters.", fix=FIX)
    if source is not EndpointSource.WORKFLOW:
        host_port(value, field, allow_credentials=True)
        return Endpoint(value, EndpointSource.USER, f"Endpoint: {value}")
    host, port = host_port(value, field)
    if configured and host_port(configured, "HF_ENDPOINT", allow_credentials=True) == (host, port):
        return Endpoint(value, EndpointSource.WORKFLOW, f"Endpoint: {value} (workflow; same host as HF_ENDPOINT)")
    token_home = host_port(DEFAULT_ENDPOINT, "endpoint") == (host, port)
    ensure_public_host(value, resolver=resolver, field=field)
    note = "" if token_home else "; no token sent"
    guard = functools.partial(ensure_public_host, resolver=resolver, field=field)
    return Endpoint(value, EndpointSource.WORKFLOW, f"Endpoint: {value} (from the workflow{note})",
                    send_token=token_home, redirect_guard=guard)


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return sorted({info[4][0] for info in infos})


def host_port(url: str, field: str, *, allow_credentials: bool = False) -> tuple[str, int]:
    """(host, port) of an http(s) URL; InvalidInputError naming ``field`` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidInputError(field, f"{url!r} must start with http:// or https://.", fix=FIX)
    if not allow_credentials and (parts.username is not None or parts.password is not None):
        # Credentials in a widget would travel inside the workflow JSON and the PNG metadata.
        raise InvalidInputError(field, "must not contain a user name or password.", fix="Use HF_TOKEN.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise InvalidInputError(field, f"{url!r} has an invalid port.", fix=FIX) from err
    if not parts.hostname:
        raise InvalidInputError(field, f"{url!r} has no host name.", fix=FIX)
    return parts.hostname.lower().rstrip("."), port


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def ensure_public_host(url: str, *, resolver: Resolver | None = None, field: str = "endpoint") -> None:
    """Raise InvalidInputError unless every address of ``url``'s host is public (not loopback, private,
    link-local or reserved). Used for a workflow's endpoint and for every redirect it answers with."""
    host, port = host_port(url, field)
    try:
        # A literal address needs no DNS (and no fake resolver may call it public).
        addresses = [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        addresses = None
    try:
        addresses = addresses or (resolver or system_resolver)(host, port)
    except OSError as err:
        raise InvalidInputError(field, f"host {host!r} cannot be resolved ({err}).", fix=FIX) from err
    blocked = [a for a in addresses if not is_public(a)]
    if not addresses or blocked:
        shown = ", ".join(blocked) or "no address"
        raise InvalidInputError(
            field,
            f"{url!r} resolves to a non-public (loopback, private, link-local or reserved) address ({shown}); a workflow "
            "may only name such a host when the same host is configured in HF_ENDPOINT.",
            fix=FIX,
        )
