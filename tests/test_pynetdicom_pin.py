"""pyproject pins exactly the pynetdicom version the fast path (net/reactor.py, net/fast_store.py) is proven on."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from medclf_node.net.reactor import PYNETDICOM_VERSION

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_pins_the_fast_path_version() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = [d for d in deps if re.match(r"pynetdicom\b", d)]
    assert pins == [f"pynetdicom=={PYNETDICOM_VERSION}"]
