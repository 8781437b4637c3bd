"""Who may associate with the node: ``--allow AE[@HOST]...``.

An entry ``AE`` allows that calling AE title from any address; ``AE@HOST`` only from that address
(an IP address, or a name resolved once at start). With no entry at all the node is closed to
the network: any AE title, but only from this machine (127.0.0.1 or ::1). Every other
association is rejected ("calling AE title not recognised") and logged.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

LOOPBACK = frozenset({"127.0.0.1", "::1"})
MAX_AE_CHARS = 16


@dataclass(frozen=True)
class AllowEntry:
    """One ``--allow`` entry: an AE title, and the addresses it may come from (empty: any)."""

    ae_title: str
    addresses: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        """``AE`` or ``AE@HOST`` -> an entry.

        Raises:
            ValueError: an empty or too long AE title, or a host that does not resolve.
        """
        ae, at, host = text.partition("@")
        ae = ae.strip()
        if at and not host.strip().strip("[]"):
            raise ValueError(
                f"--allow {text!r}: '@' with no host after it. Give AE alone (any address) or "
                "AE@HOST, e.g. US-ROOM1@10.0.0.21."
            )
        if not ae or len(ae) > MAX_AE_CHARS or "\\" in ae:
            raise ValueError(
                f"--allow takes AE or AE@HOST, with an AE title of 1 to {MAX_AE_CHARS} characters "
                f"(no backslash), e.g. US-ROOM1@10.0.0.21. Got {text!r} instead."
            )
        if not host:
            return cls(ae)
        host = host.strip().strip("[]")
        try:
            return cls(ae, frozenset({str(ipaddress.ip_address(host))}))
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError as exc:
            raise ValueError(
                f"--allow {text!r}: the host {host!r} does not resolve ({exc}). Give its IP "
                "address instead."
            ) from None
        return cls(ae, frozenset(str(info[4][0]) for info in infos))


class AllowList:
    """The association filter (see the module docstring)."""

    def __init__(self, entries: list[AllowEntry] | tuple[AllowEntry, ...] = ()) -> None:
        self.entries = tuple(entries)

    @classmethod
    def parse(cls, texts: list[str] | tuple[str, ...] | None) -> AllowList:
        """Entries from ``--allow`` arguments (None or empty: loopback only)."""
        return cls([AllowEntry.parse(text) for text in texts or ()])

    def allows(self, ae_title: str, address: str) -> bool:
        """Whether a calling AE title from an address may associate."""
        address = _normal(address)
        if not self.entries:
            return address in LOOPBACK
        ae_title = ae_title.strip()
        return any(
            entry.ae_title == ae_title and (not entry.addresses or address in entry.addresses)
            for entry in self.entries
        )

    def describe(self) -> str:
        """For the start-up line: who may send."""
        if not self.entries:
            return "any AE title from this machine only (no --allow given)"
        return ", ".join(
            entry.ae_title + ("@" + "|".join(sorted(entry.addresses)) if entry.addresses else "")
            for entry in self.entries
        )


def _normal(address: str) -> str:
    """``::ffff:10.0.0.1`` -> ``10.0.0.1``; other addresses as given."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = getattr(parsed, "ipv4_mapped", None)
    return str(mapped or parsed)
