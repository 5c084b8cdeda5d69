"""DICOM TLS (PS3.15 B.1, the "secure transport connection profile"): ssl contexts from ``[tls]``.

One place builds the contexts so that the listener and every outgoing association use the
same certificate, CA and minimum version.  The listener offers ``[tls].cert``; with
``require_client_cert`` a client must present a certificate signed by ``[tls].ca``
(mutual TLS).  Outgoing associations (peers with ``tls = true``) verify the peer's
certificate against ``[tls].ca`` (or the system store when none is given), check its host
name or IP address, and present ``[tls].cert`` as client certificate when one is configured.
"""

from __future__ import annotations

import logging
import ssl

from medclf_node.config import TlsSection

log = logging.getLogger(__name__)

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file."""


def _load_chain(ctx: ssl.SSLContext, tls: TlsSection) -> None:
    if tls.cert is None or tls.key is None:
        return
    try:
        ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"tls.cert/tls.key ({tls.cert}, {tls.key}): cannot load: {exc}") from exc


def _load_ca(ctx: ssl.SSLContext, tls: TlsSection) -> None:
    if tls.ca is None:
        return
    try:
        ctx.load_verify_locations(cafile=str(tls.ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"tls.ca ({tls.ca}): cannot load: {exc}") from exc


def server_context(tls: TlsSection) -> ssl.SSLContext:
    """The listener's context: our certificate, and client certificates checked against ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    _load_chain(ctx, tls)
    _load_ca(ctx, tls)
    if tls.require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL  # a certificate offered is still checked
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: TlsSection) -> ssl.SSLContext:
    """The context for associations we open: the peer is always verified (host name included)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = _VERSIONS[tls.min_version]
    if tls.ca is not None:
        _load_ca(ctx, tls)
    else:
        ctx.load_default_certs()
    _load_chain(ctx, tls)
    return ctx
