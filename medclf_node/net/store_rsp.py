"""C-STORE responses encoded directly (written for pynetdicom 3.0.4).

Why: pynetdicom turns every response primitive into a pydicom command-set dataset, encodes it
twice (once for the group length, once to send) with pydicom's generic writer, then fragments
it: about a millisecond of CPU per C-STORE on our machines, more than the node spends storing
a 512 kB instance.  A C-STORE-RSP with only a status is seven fixed elements, so
:class:`FastStoreResponseDIMSE` encodes those by hand (implicit VR little endian, as PS3.7 6.3.1
requires for command sets) and hands the DUL the same single P-DATA pynetdicom would.
``tests/test_intake_fastpath.py`` compares the bytes with pynetdicom's for several statuses.

Everything else (requests, responses with an error comment or offending element, an
association with an EVT_DIMSE_SENT handler bound, a peer PDU too small for one fragment)
goes through pynetdicom's own ``send_msg`` unchanged.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

C_STORE_RSP = 0x8001
NO_DATASET = 0x0101


def _ui(tag_elem: int, value: object) -> bytes | None:
    if not isinstance(value, str) or not value or len(value) > 64 or not value.isascii():
        return None
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"
    return struct.pack("<HHI", 0x0000, tag_elem, len(raw)) + raw


def _us(tag_elem: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, tag_elem, 2, value)


def encode_store_response_fields(msg_id: object, sop_class_uid: object, sop_instance_uid: object,
                                 status: object) -> bytes | None:
    """The implicit VR LE command set of a status-only C-STORE-RSP, or ``None`` for unusual values."""
    if not isinstance(status, int) or not isinstance(msg_id, int) or not 0 <= status <= 0xFFFF:
        return None
    if not 0 <= msg_id <= 0xFFFF:
        return None
    sop_class = _ui(0x0002, sop_class_uid)
    sop_instance = _ui(0x1000, sop_instance_uid)
    if sop_class is None or sop_instance is None:
        return None
    body = b"".join(
        (
            sop_class,
            _us(0x0100, C_STORE_RSP),
            _us(0x0120, msg_id),
            _us(0x0800, NO_DATASET),
            _us(0x0900, status),
            sop_instance,
        )
    )
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def encode_store_response(primitive: Any) -> bytes | None:
    """The implicit VR LE command set of a status-only C-STORE-RSP, or ``None`` if it is not one."""
    if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    return encode_store_response_fields(primitive.MessageIDBeingRespondedTo, primitive.AffectedSOPClassUID,
                                        primitive.AffectedSOPInstanceUID, primitive.Status)


class FastStoreResponseDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with status-only C-STORE responses encoded by hand."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = encode_store_response(primitive)
        max_pdu = self.maximum_pdu_size
        if command is None or self.assoc.get_handlers(evt.EVT_DIMSE_SENT) or (max_pdu and len(command) > max_pdu - 6):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)
