"""Where webhooks may go: never to link-local or cloud metadata addresses.

A webhook URL is chosen by whoever creates a prediction, so the server must not become a way
to reach its own cloud metadata service (169.254.169.254 and friends) or other link-local
hosts. The check runs on the addresses actually connected to: IP literals before the request,
and names through `GuardedResolver`, after DNS, so a name that resolves (or rebinds) to a
forbidden address is refused too. Loopback and private addresses are allowed unless the
operator denies them (`--webhook-deny-private`).
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Metadata services outside the link-local ranges (AWS over IPv6, Alibaba Cloud).
_METADATA = frozenset(
    {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressForbidden(OSError):
    """The webhook's host is, or resolves to, an address webhooks may not reach."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, NAT64 or 6to4), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def forbidden_reason(address: IPAddress, *, deny_private: bool) -> str | None:
    """Why webhooks may not go to `address`, or None if they may."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return forbidden_reason(embedded, deny_private=deny_private)
    private = "a loopback or private address, which this server is set to refuse"
    if address.is_loopback:  # before is_reserved, which ::1 also is
        return private if deny_private else None
    if address in _METADATA:
        return "a cloud metadata address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return "not a unicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _THIS_NETWORK:
        return "not a unicast address"
    if deny_private and (address.is_private or address in _SHARED):
        return private
    return None


def check_literal(host: str, *, deny_private: bool) -> None:
    """Raise AddressForbidden if `host` is an IP literal webhooks may not reach."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return  # a name: GuardedResolver checks what it resolves to
    reason = forbidden_reason(address, deny_private=deny_private)
    if reason is not None:
        raise AddressForbidden(f"webhooks may not be sent to {host}: it is {reason}")


class GuardedResolver(AbstractResolver):
    """Resolves through another resolver and keeps only the addresses webhooks may reach."""

    def __init__(self, inner: AbstractResolver, *, deny_private: bool) -> None:
        self._inner = inner
        self._deny_private = deny_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = []
        reasons = set()
        for result in results:
            address = ipaddress.ip_address(result["host"].split("%")[0])
            reason = forbidden_reason(address, deny_private=self._deny_private)
            if reason is None:
                allowed.append(result)
            else:
                reasons.add(f"{address} is {reason}")
        if not allowed:
            raise AddressForbidden(
                f"webhooks may not be sent to {host}: {'; '.join(sorted(reasons))}"
            )
        return allowed

    async def close(self) -> None:
        await self._inner.close()
