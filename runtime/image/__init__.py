"""Private implementation of measured enclave images; the public API is :mod:`runtime.eif`.

Layers: ``_format`` (EIF v4 container, CRC, PCRs; pure), ``_cpio`` (newc archives; pure),
``_cose`` (PCR0 signature section; pure crypto), ``_content`` (what goes into the sections:
reads the project tree, the app dir and the installed distributions), ``_unpack`` (extraction
and verification of an unpacked tree; filesystem).
"""

__all__ = []
