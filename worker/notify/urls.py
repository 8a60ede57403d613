"""Where a delivery may go: https only, never to private, loopback or link-local addresses.

Checked twice: when a destination is added (``check_url`` + ``resolve_checked``) and on every attempt, by
the resolver the HTTP client connects through (``SafeResolver``), so a name that starts resolving to an
internal address later (DNS rebinding) is refused at the moment of connecting, to the address connected to.
Exceptions are configured explicitly (``COST_WORKER_NOTIFY_ALLOWED_NETWORKS``, ``COST_WORKER_NOTIFY_ALLOW_HTTP``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from worker.config import Settings, split_list
from worker.errors import CostWorkerError

MAX_URL_LENGTH = 2_048  # characters
RESOLVE_TIMEOUT = 3.0  # seconds a name lookup may take when a destination is added

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class UrlRefused(CostWorkerError):
    """The destination URL is not allowed."""


@dataclass(frozen=True)
class UrlPolicy:
    allow_http: bool = False
    allowed_networks: tuple[Network, ...] = field(default_factory=tuple)

    @classmethod
    def from_settings(cls, settings: Settings) -> UrlPolicy:
        return cls(
            allow_http=settings.notify_allow_http,
            allowed_networks=tuple(
                ipaddress.ip_network(n, strict=False) for n in split_list(settings.notify_allowed_networks)
            ),
        )

    def check_address(self, address: Address) -> None:
        """Refuse an address that is not public, unless a configured network allows it."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        if any(address in network for network in self.allowed_networks):
            return
        if not address.is_global or address.is_multicast or address.is_reserved or address.is_unspecified:
            raise UrlRefused(f"address {address} is not public (private, loopback, link-local or reserved)")

    def check_url(self, url: str) -> SplitResult:
        """Static checks of a URL (no lookups): scheme, host, no credentials, IP literals public."""
        if len(url) > MAX_URL_LENGTH:
            raise UrlRefused(f"URL longer than {MAX_URL_LENGTH} characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UrlRefused(f"not a URL: {exc}") from None
        allowed = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in allowed:
            raise UrlRefused(f"scheme {parts.scheme or 'none'}:// is not allowed (only {', '.join(allowed)})")
        if not parts.hostname:
            raise UrlRefused("URL has no host")
        if parts.username is not None or parts.password is not None:
            raise UrlRefused("URL must not carry credentials (user:password@)")
        if port == 0:
            raise UrlRefused("port 0 is not a port")
        literal = _ip(parts.hostname)
        if literal is not None:
            self.check_address(literal)
        return parts

    async def check(self, url: str) -> SplitResult:
        """Every check, the name lookup included: every address the name resolves to must be allowed."""
        parts = self.check_url(url)
        assert parts.hostname is not None
        if _ip(parts.hostname) is None:
            loop = asyncio.get_running_loop()
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT
                )
            except (OSError, TimeoutError) as exc:
                raise UrlRefused(f"cannot resolve {parts.hostname}: {exc}") from None
            for info in infos:
                address = _ip(str(info[4][0]))
                if address is None:
                    raise UrlRefused(f"{parts.hostname} resolved to a non-IP address")
                self.check_address(address)
        return parts


def origin(parts: SplitResult) -> str:
    """scheme://host[:port], for display (the path and query may hold a token)."""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def _ip(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


class SafeResolver(AbstractResolver):
    """aiohttp's resolver, filtered: a name resolving to any refused address is not connected to at all."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy
        self.inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            address = _ip(result["host"])
            if address is None:
                raise UrlRefused(f"{host} resolved to a non-IP address")
            self.policy.check_address(address)
        return results

    async def close(self) -> None:
        await self.inner.close()
