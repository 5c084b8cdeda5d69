"""A small C-STORE SCP that keeps what it receives: the result receiver of `medclf-node demo`
(a stand-in PACS on loopback) and of the test suite.

It decodes each dataset (unlike the node's intake, which stores raw bytes) because its users
want to look at the objects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

log = logging.getLogger(__name__)


class StoringReceiver:
    """Listens on ``host:port`` as ``ae_title``; writes every instance to ``out_dir/<SOP UID>.dcm``
    (with ``out_dir=None`` it only counts and keeps the datasets in memory).

    ``counts`` records how often each SOP Instance UID arrived, so duplicates are visible.
    """

    def __init__(self, ae_title: str, port: int, out_dir: Path | None = None, *, host: str = "127.0.0.1") -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.counts: Counter[str] = Counter()
        self.datasets: dict[str, Dataset] = {}
        self.paths: dict[str, Path] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax)
        ae.add_supported_context(Verification)
        server = ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None  # block=False always returns the server
        self.server = server
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            uid = str(ds.SOPInstanceUID)
            path = None
            if self.out_dir is not None:
                path = self.out_dir / f"{uid}.dcm"
                ds.save_as(path, enforce_file_format=True)
        except Exception:
            log.exception("receiver: cannot store an instance")
            return 0xC211
        with self._lock:
            self.counts[uid] += 1
            self.datasets[uid] = ds
            if path is not None:
                self.paths[uid] = path
        return 0x0000

    def of_modality(self, modality: str) -> list[Dataset]:
        with self._lock:
            return [ds for ds in self.datasets.values() if ds.get("Modality") == modality]

    def wait_for(self, pred: Callable[[StoringReceiver], bool], timeout: float) -> bool:
        """Poll ``pred(self)`` until it is true or ``timeout`` seconds passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self):
                return True
            time.sleep(0.1)
        return pred(self)

    def stop(self) -> None:
        self.server.shutdown()
