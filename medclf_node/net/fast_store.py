"""C-STORE requests read straight from P-DATA-TF PDUs (written for pynetdicom 3.0.4).

Why: for every PDU pynetdicom builds a PDU object, a P-DATA primitive, copies each fragment
two or three times into a ``BytesIO``, decodes the command set with pydicom, validates every
value of a ``C_STORE`` primitive (regular expressions), builds an event, and on the way back
encodes the response with pydicom again.  For a 512 kB CT slice that is most of the node's
CPU per instance; DCMTK's storescp spends 1.75 ms on the whole instance.

This module holds the pure parts of a narrower path for the one message a CT scanner sends
thousands of times: split a P-DATA-TF body into its PDVs, decode a C-STORE-RQ command set
(implicit VR little endian, PS3.7 6.3.1) by hand, and encode the status-only response PDU.
Each function answers only when sure; for anything else it returns ``None`` and
:class:`medclf_node.net.reactor.WakeableDUL` replays the message through pynetdicom's own code,
so unusual input behaves exactly as before.  ``tests/test_fast_store.py`` checks the decoding
against pydicom and the response bytes against pynetdicom's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from medclf_node.dicom_uid import is_valid_uid
from medclf_node.net.store_rsp import encode_store_response_fields

C_STORE_RQ = 0x0001
NO_DATASET = 0x0101
P_DATA_TF = 0x04

# (0000,xxxx) elements a C-STORE-RQ may carry (PS3.7 table 9.3-1) and their value lengths (None: variable)
_STORE_RQ_ELEMENTS: dict[int, int | None] = {
    0x0000: 4,  # CommandGroupLength UL
    0x0002: None,  # AffectedSOPClassUID UI
    0x0100: 2,  # CommandField US
    0x0110: 2,  # MessageID US
    0x0700: 2,  # Priority US
    0x0800: 2,  # CommandDataSetType US
    0x1000: None,  # AffectedSOPInstanceUID UI
    0x1030: None,  # MoveOriginatorApplicationEntityTitle AE
    0x1031: 2,  # MoveOriginatorMessageID US
}
_PDV_HEADER = struct.Struct(">LB")
_ELEMENT_HEADER = struct.Struct("<HHL")
_US = struct.Struct("<H")


@dataclass(frozen=True)
class StoreRequest:
    """The fields of a C-STORE-RQ the node needs (and echoes in the response)."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    priority: int


def split_pdvs(body: memoryview) -> list[tuple[int, int, memoryview]] | None:
    """``[(context_id, message_control_header, fragment)]`` of a P-DATA-TF PDU body (after its 6-byte header).

    ``None`` when an item is shorter than its context ID and control header or runs past the
    end: pynetdicom's decoder decides what such a PDU means.
    """
    items: list[tuple[int, int, memoryview]] = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 6:
            return None
        length, context_id = _PDV_HEADER.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end:
            return None
        items.append((context_id, body[pos + 5], body[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return items


def _uid(raw: bytes) -> str | None:
    """A UI value as pydicom decodes it, or ``None`` when it is not a plain valid UID."""
    if not raw.isascii():
        return None
    text = raw.decode("ascii").rstrip("\x00 ")
    return text if is_valid_uid(text) else None


def _plain_ae(raw: bytes) -> bool:
    """An AE title pynetdicom accepts without question: printable ASCII, <= 16 characters, no backslash."""
    text = raw.decode("latin-1").strip(" \x00")
    return raw.isascii() and len(text) <= 16 and text.isprintable() and "\\" not in text


def decode_store_request(command: bytes, context_id: int) -> StoreRequest | None:
    """The C-STORE-RQ in an implicit VR LE command set, or ``None`` for anything else.

    ``None`` for other commands, a C-STORE without a data set, an element outside the
    C-STORE-RQ's, a wrong value length, a missing required element, an unusual UID or
    priority: all of these go to pynetdicom, which answers, ignores or aborts as it always did.
    """
    values: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(command, pos)
        pos += 8
        expected = _STORE_RQ_ELEMENTS.get(element, -1)
        if group != 0x0000 or expected == -1 or element in values or pos + length > end:
            return None
        if expected is not None and length != expected:
            return None
        values[element] = command[pos : pos + length]
        pos += length
    required = (0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000)
    if any(tag not in values for tag in required):
        return None
    if _US.unpack(values[0x0100])[0] != C_STORE_RQ or _US.unpack(values[0x0800])[0] == NO_DATASET:
        return None
    priority = _US.unpack(values[0x0700])[0]
    sop_class, sop_instance = _uid(values[0x0002]), _uid(values[0x1000])
    if priority not in (0, 1, 2) or sop_class is None or sop_instance is None:
        return None
    if 0x1030 in values and not _plain_ae(values[0x1030]):
        return None
    return StoreRequest(
        context_id=context_id,
        message_id=_US.unpack(values[0x0110])[0],
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        priority=priority,
    )


def store_response_pdu(request: StoreRequest, status: int) -> bytes | None:
    """The P-DATA-TF PDU carrying a status-only C-STORE-RSP to ``request``, as pynetdicom sends it."""
    command = encode_store_response_fields(request.message_id, request.sop_class_uid,
                                           request.sop_instance_uid, status)
    if command is None:
        return None
    item = struct.pack(">LBB", len(command) + 2, request.context_id, 0x03) + command
    return struct.pack(">BBL", P_DATA_TF, 0x00, len(item)) + item


__all__ = ["StoreRequest", "decode_store_request", "split_pdvs", "store_response_pdu"]
