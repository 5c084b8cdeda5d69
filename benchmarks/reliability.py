"""Reliability figures: run the fault, load, fuzz, bad-input, limit and TLS tests and write
``docs/reliability.md`` from what they measured (never typed by hand).

The tests record their figures (rounds, instances, losses, ...) as JSON lines when
``MEDCLF_RELIABILITY_OUT`` is set; this script sets it, chooses the sizes, runs pytest, and
renders one table.  A failing test is reported in the document as failing.

    .venv/bin/python benchmarks/reliability.py [--rounds 20] [--fuzz-examples 200]
        [--load-rows 64] [--load-slices 300] [--abuse-full] [--out docs/reliability.md]

``--abuse-full`` runs the load-under-abuse test at issue 15's size: 300 silent + 60 garbage
connections per wave while 8 DCMTK senders send 200 slices of 512 x 512 each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ["tests/test_faults.py", "tests/test_load.py", "tests/test_abuse.py", "tests/test_fuzz.py",
              "tests/test_badinput.py", "tests/test_limits.py", "tests/test_intake_gate.py",
              "tests/test_decode_bounds.py", "tests/test_phi_logs.py", "tests/test_tls.py"]
#: the load-under-abuse sizes: CI (the test's defaults) and issue 15's (--abuse-full)
ABUSE_FULL = {"MEDCLF_ABUSE_SILENT": "300", "MEDCLF_ABUSE_GARBAGE": "60", "MEDCLF_ABUSE_SENDERS": "8",
              "MEDCLF_ABUSE_SLICES": "200", "MEDCLF_ABUSE_ROWS": "512"}
MAIN_COLUMNS = ("rounds", "instances", "losses")
SUITE_NOTES = {
    "test_limits": "each [limits] key: association limit (A-ASSOCIATE-RJ 2/3/2), idle timeout, slowloris, "
                   "instance size, instances per series, frame/voxel caps at intake (0xA700) and volume stage",
    "test_intake_gate": "pre-association gate: probes/garbage/huge PDU length vs echoscu, silent sockets cost no "
                        "thread or slot, ARTIM, peer EOF, per-host and per-AE caps, eviction of waiting connections",
    "test_decode_bounds": "JPEG / JPEG-LS / JPEG 2000 frames whose header claims 20000 x 20000 in a 512 x 512 DICOM: "
                          "refused (codec_mismatch) before any decoder runs, node memory bounded",
    "test_phi_logs": "patient data in every demographic field, invalid UIDs, dates and codes: none in the node log "
                     "(DEBUG), audit, metrics or index",
    "test_badinput": "raw-socket PDUs (garbage, unknown type, truncated, bad lengths, garbage P-DATA) and malformed "
                     "datasets (invalid/path UIDs, corrupt lengths, no/short pixels, wrong transfer syntax, non-image)",
}


ANSWERS = [
    ("more than `limits.max_associations` negotiated associations, or more than "
     "`limits.max_associations_per_host` from one IP address / `limits.max_associations_per_ae` with one calling "
     "AE title",
     "A-ASSOCIATE-RJ result 2 (transient), source 3, reason 2 \"local limit exceeded\""),
    ("a connection that has not sent a complete A-ASSOCIATE-RQ",
     "held by the gate (one file descriptor, no thread, no association slot); closed at once on EOF, A-ABORT at "
     "once for another PDU type or a length outside [68, `limits.max_associate_rq_bytes`], closed after "
     "`limits.artim_timeout_seconds` (at most `idle_timeout_seconds`); past `limits.max_pending_connections` the "
     "oldest waiting connection of the host with the most of them is closed"),
    ("no traffic for `limits.idle_timeout_seconds` on an association (idle, PDU stopped half-way)",
     "A-ABORT / connection closed"),
    ("malformed PDU, unknown PDU type, undecodable DIMSE command set", "A-ABORT (or close); the node keeps serving"),
    ("instance larger than `limits.max_instance_bytes`; series beyond `limits.max_instances_per_series`; "
     "Rows x Columns (x frames) beyond `limits.max_frame_pixels` / `limits.max_series_voxels`",
     "C-STORE 0xA700 \"Refused: Out of Resources\" (PS3.4 B.2.3): the data may be valid, this node will not "
     "take that much"),
    ("bytes that do not parse, missing/invalid UIDs (path characters included)",
     "C-STORE 0xC210 \"Cannot understand\"; nothing is written"),
    ("disk full, read-only spool", "C-STORE 0xA700; no partial file is visible"),
    ("series whose headers exceed the caps, in the volume stage",
     "series `failed`, reason `too_large`, decided from headers before any pixel is decoded"),
    ("a JPEG / JPEG-LS / JPEG 2000 frame whose own header (SOF / SOF55 / SIZ) disagrees with Rows, Columns, "
     "Samples per Pixel or Bits Allocated",
     "series `failed`, reason `codec_mismatch`, before any decoder allocates (an unreadable codec header: "
     "`decode_failed`)"),
    ("missing/short pixel data, wrong transfer-syntax claim",
     "stored as received (0x0000, the intake never decodes); the volume stage refuses with `no_pixels` / "
     "`decode_failed`"),
    ("TLS: plain TCP, no client certificate (when required), certificate from another CA",
     "the handshake (run by the gate, non-blocking) fails, logged; other clients keep being served"),
    ("a value that fails validation (e.g. a patient ID in a UID field)",
     "logged and recorded by kind and length only (`<text: 10 chars, letters+digits>`), never its content"),
]

KNOWN_LIMITS = [
    "`limits.max_instance_bytes` is checked once pynetdicom has received the whole instance (it buffers each "
    "dataset in memory and does not bound the size of a received PDU), so one association can make the node "
    "hold one instance of any size in memory before it is refused.",
    "A `kill -9` between the rename of a file and its index commit leaves a complete but unacknowledged file "
    "that is not indexed (counted as *unacknowledged complete files at crash*); the sender re-sends it (no "
    "Success was given) and the re-send replaces it. It is not reconciled at start-up.",
    "The per-host cap counts IP addresses: senders behind one NAT or load balancer share "
    "`limits.max_associations_per_host` (raise it to `max_associations` there).",
    "Waiting connections cost one file descriptor each: `limits.max_pending_connections` (512) plus the "
    "associations must fit the process's open-file limit (`ulimit -n`).",
    "A JPEG frame that defers its height to a DNL marker (SOF height 0) is refused as `codec_mismatch`; no "
    "DICOM encoder we know writes one.",
    "Another process holding the SQLite write lock longer than the index's busy timeout (10 s) makes a "
    "C-STORE fail with 0xC211 (from the code's error mapping; the test measures a 3 s lock, which is waited "
    "out); the instance was not acknowledged, so nothing is lost.",
]


def decisions() -> str:
    rows = "\n".join(f"| {situation} | {answer} |" for situation, answer in ANSWERS)
    limits = "\n".join(f"- {text}" for text in KNOWN_LIMITS)
    return (f"## Answers the node gives\n\n| situation | answer |\n|---|---|\n{rows}\n\n"
            f"## Known limits\n\n{limits}\n")


def run_tests(env: dict[str, str], junit: Path) -> int:
    cmd = [sys.executable, "-m", "pytest", *TEST_FILES, "-q", "-p", "no:warnings", f"--junitxml={junit}"]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def suite_outcomes(junit: Path) -> dict[str, dict[str, int]]:
    """Per test module: passed / failed / skipped counts from the JUnit XML."""
    out: dict[str, dict[str, int]] = {}
    if not junit.exists():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = (case.get("classname") or "").split(".")[-1]
        kind = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            kind = "failed"
        elif case.find("skipped") is not None:
            kind = "skipped"
        out.setdefault(module, {"passed": 0, "failed": 0, "skipped": 0})[kind] += 1
    return out


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k.replace('_', ' ')}: {_cell(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|")


def render(records: list[dict[str, Any]], suites: dict[str, dict[str, int]], args: argparse.Namespace,
           rc: int) -> str:
    lines = [
        "# Reliability and security figures",
        "",
        "Generated by `benchmarks/reliability.py`; do not edit by hand. Command:",
        "",
        f"    .venv/bin/python benchmarks/reliability.py --rounds {args.rounds} "
        f"--fuzz-examples {args.fuzz_examples} --load-rows {args.load_rows} --load-slices {args.load_slices}"
        f"{' --abuse-full' if args.abuse_full else ''}",
        "",
        f"Run {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} on {os.cpu_count()} CPU cores; "
        f"pytest exit status {rc} ({'all passed' if rc == 0 else 'SOME TESTS FAILED: see below'}).",
        "",
        "| test | what it does | rounds | instances | losses | other figures |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        other = {k: v for k, v in r.items() if k not in ("test", "what", *MAIN_COLUMNS)}
        lines.append("| " + " | ".join([
            _cell(r["test"]), _cell(r["what"]), *(_cell(r.get(c, "")) for c in MAIN_COLUMNS), _cell(other),
        ]) + " |")
    lines += ["", "Test modules (pass / fail / skip):", "", "| module | passed | failed | skipped | covers |",
              "|---|---|---|---|---|"]
    for module, counts in sorted(suites.items()):
        lines.append(f"| {module} | {counts['passed']} | {counts['failed']} | {counts['skipped']} | "
                     f"{SUITE_NOTES.get(module, '')} |")
    lines += [
        "",
        "Definitions: *instances* counts DICOM objects sent; *losses* counts objects the node acknowledged "
        "(C-STORE 0x0000) or queued that were missing afterwards. *duplicate deliveries (same UID)* are re-sends "
        "after a crash between the peer's Success and the node's own bookkeeping; they carry the same SOP "
        "Instance UID, so the receiving PACS recognises them (at-least-once delivery, never a second different "
        "report).",
        "",
        decisions(),
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="kill -9 rounds per fault test")
    ap.add_argument("--fuzz-examples", type=int, default=200)
    ap.add_argument("--load-rows", type=int, default=64, help="slice size of the load test (512 = full CT)")
    ap.add_argument("--load-slices", type=int, default=300)
    ap.add_argument("--abuse-full", action="store_true",
                    help="load under abuse at issue 15's size (300 silent, 60 garbage, 8 x 200 slices 512x512)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = ap.parse_args()
    print(describe_machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.jsonl"
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ, "MEDCLF_RELIABILITY_OUT": str(figures), "MEDCLF_FAULT_ROUNDS": str(args.rounds),
               "MEDCLF_FUZZ_EXAMPLES": str(args.fuzz_examples), "MEDCLF_LOAD_ROWS": str(args.load_rows),
               "MEDCLF_LOAD_SLICES": str(args.load_slices), **(ABUSE_FULL if args.abuse_full else {})}
        rc = run_tests(env, junit)
        records = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
        suites = suite_outcomes(junit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(records, suites, args, rc), encoding="utf-8")
    print(f"wrote {args.out} ({len(records)} scenario rows)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
