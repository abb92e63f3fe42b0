"""Measured enclave images: the EIF v4 format of Nitro Enclaves, built from an app directory.

An image is an EIF file (``reference/nitro.md`` §2) whose sections hold what our enclaves boot
instead of a Linux kernel:

==========  ==================================================================================
Kernel      a JSON manifest: the in-enclave init module (``runtime.enclave_init``) and the
            interpreter (implementation, version, ABI, machine)
Cmdline     ``console=ttyS0 init=runtime.enclave_init``
Metadata    nitro-cli's ``EifIdentityInfo`` JSON (not measured)
Ramdisk[0]  bootstrap cpio: ``enclave-identity.json`` (interpreter + installed dependency set)
            and the project's enclave-side code: ``attest/ kms/ models/ transport/`` (``*.py``,
            ``py.typed``, ``*.pem`` trust anchors), ``runtime/__init__.py`` (a stub),
            ``runtime/enclave_init/``
Ramdisk[1]  app cpio: ``manifest.json`` (``cmd`` argv list and ``env``) and ``rootfs/`` (the
            app directory)
Signature   optional COSE_Sign1 over PCR0 (``--signing-certificate``/``--private-key``)
==========  ==================================================================================

So PCR1 (kernel + cmdline + bootstrap) measures the enclave-side code, the interpreter and the
dependency set; PCR2 measures the application (files, command, environment); PCR0 both; PCR8 the
signing certificate. Builds are deterministic: the same inputs give the same bytes.

Typical use (runtime side)::

    eif = read_eif(path)                 # structure + CRC checked, PCRs computed
    eif.check_signature()                # E59 if a signed image does not verify
    image = unpack_eif(eif, workdir)     # read-only tree
    verify_unpacked(eif, image)          # right before starting: refuse a tampered tree
    ... PYTHONPATH=image.bootstrap_dir, cwd=image.app_dir, argv=image.cmd, env=image.env
    remove_unpacked(image.root)          # the tree is read-only; this restores and deletes
"""

from __future__ import annotations

from attest.pcrs import pcr_extend as pcr_extend
from runtime.image._build import EifInfo as EifInfo
from runtime.image._build import build_eif as build_eif
from runtime.image._build import sign_eif as sign_eif
from runtime.image._errors import EifArgumentError as EifArgumentError
from runtime.image._errors import EifBuildError as EifBuildError
from runtime.image._errors import EifError as EifError
from runtime.image._errors import EifFileError as EifFileError
from runtime.image._errors import EifFormatError as EifFormatError
from runtime.image._errors import EifMetadataError as EifMetadataError
from runtime.image._errors import EifSignatureError as EifSignatureError
from runtime.image._errors import EifSigningError as EifSigningError
from runtime.image._errors import ImageTamperedError as ImageTamperedError
from runtime.image._format import EIF_VERSION as EIF_VERSION
from runtime.image._format import EifSection as EifSection
from runtime.image._format import SectionType as SectionType
from runtime.image._measure import HASH_ALGORITHM as HASH_ALGORITHM
from runtime.image._measure import nitro_measurements as nitro_measurements
from runtime.image._measure import pcr3_role_arn as pcr3_role_arn
from runtime.image._measure import pcr4_instance_id as pcr4_instance_id
from runtime.image._measure import pcr8_from_certificate as pcr8_from_certificate
from runtime.image._measure import pcr_from_bytes as pcr_from_bytes
from runtime.image._read import MAX_EIF_SIZE as MAX_EIF_SIZE
from runtime.image._read import MAX_INPUT_FILE_SIZE as MAX_INPUT_FILE_SIZE
from runtime.image._read import EifFile as EifFile
from runtime.image._read import read_eif as read_eif
from runtime.image._read import read_regular_file as read_regular_file
from runtime.image._unpacked import UnpackedImage as UnpackedImage
from runtime.image._unpacked import load_unpacked as load_unpacked
from runtime.image._unpacked import remove_unpacked as remove_unpacked
from runtime.image._unpacked import unpack_eif as unpack_eif
from runtime.image._unpacked import verify_environment as verify_environment
from runtime.image._unpacked import verify_unpacked as verify_unpacked

__all__ = [
    # building and reading
    "build_eif",
    "sign_eif",
    "read_eif",
    "EifInfo",
    "EifFile",
    "EifSection",
    "SectionType",
    # unpacking
    "unpack_eif",
    "load_unpacked",
    "verify_unpacked",
    "verify_environment",
    "remove_unpacked",
    "UnpackedImage",
    # PCRs
    "pcr_from_bytes",
    "pcr_extend",
    "pcr3_role_arn",
    "pcr4_instance_id",
    "pcr8_from_certificate",
    "nitro_measurements",
    "HASH_ALGORITHM",
    # errors
    "EifError",
    "EifFormatError",
    "EifBuildError",
    "EifSignatureError",
    "EifSigningError",
    "ImageTamperedError",
    "EifFileError",
    "EifArgumentError",
    "EifMetadataError",
    # limits / layout
    "MAX_EIF_SIZE",
    "EIF_VERSION",
    "read_regular_file",
    "MAX_INPUT_FILE_SIZE",
]
