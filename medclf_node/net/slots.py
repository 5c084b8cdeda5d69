"""Association slots: how many negotiated associations run, in all, per calling host and per AE title.

Why: pynetdicom counts every connection thread against ``maximum_associations``, so sockets
that never send an A-ASSOCIATE-RQ took the slots of real senders, and one host could take them
all.  Here a slot is taken only when a complete A-ASSOCIATE-RQ has arrived
(:mod:`medclf_node.net.gate`) and given back when the association's thread ends; the caps per
host and per calling AE title keep one peer from holding every slot.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: refusal codes (metrics / audit ``reason``); all answered with A-ASSOCIATE-RJ (2, 3, 2)
TOTAL_LIMIT = "local_limit_exceeded"
HOST_LIMIT = "host_limit_exceeded"
AE_LIMIT = "ae_limit_exceeded"


@dataclass
class Ticket:
    """One taken slot; :meth:`release` gives it back (idempotent, any thread)."""

    slots: AssociationSlots
    host: str
    ae_title: str
    owner: object | None = None  # the association thread that runs on this slot, once created
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        self.slots._release(self)


class AssociationSlots:
    """Counts running associations; :meth:`acquire` refuses past any of the three caps."""

    def __init__(self, total: int, per_host: int, per_ae: int) -> None:
        self.total, self.per_host, self.per_ae = total, per_host, per_ae
        self._lock = threading.Lock()
        self._running = 0
        self._hosts: Counter[str] = Counter()
        self._aes: Counter[str] = Counter()

    def acquire(self, host: str, ae_title: str) -> Ticket | str:
        """A :class:`Ticket`, or the refusal code when a cap is reached (host first, then AE, then total)."""
        with self._lock:
            if self._hosts[host] >= self.per_host:
                return HOST_LIMIT
            if self._aes[ae_title] >= self.per_ae:
                return AE_LIMIT
            if self._running >= self.total:
                return TOTAL_LIMIT
            self._running += 1
            self._hosts[host] += 1
            self._aes[ae_title] += 1
            return Ticket(self, host, ae_title)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._released:
                return
            ticket._released = True
            self._running -= 1
            for counter, key in ((self._hosts, ticket.host), (self._aes, ticket.ae_title)):
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

    @property
    def running(self) -> int:
        with self._lock:
            return self._running
