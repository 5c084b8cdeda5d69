"""What the node reports about itself: Prometheus metrics and the audit trail, as one handle.

Components take an optional :class:`Telemetry`; without one they get :meth:`Telemetry.disabled`
(metrics in a private registry nobody scrapes, an audit log that validates but writes nothing),
so unit tests and tools need no set-up.  Telemetry must never break the work it observes:
callers wrap their calls in ``with telemetry.guard("what"):``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from medclf_node.audit import AuditLog, NullAuditLog
from medclf_node.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Telemetry:
    metrics: Metrics
    audit: AuditLog

    @classmethod
    def disabled(cls) -> Telemetry:
        return cls(Metrics(), NullAuditLog())

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Metrics/audit calls inside are best effort: a failure is logged, never raised."""
        try:
            yield
        except Exception:
            log.exception("telemetry (%s) failed", what)
