"""Verified unpacked images shared by the enclaves of one runtime (the warm start's cache).

Each start still parses the EIF (CRC, measurements) and re-verifies the cached tree against it
byte for byte (:func:`verify_unpacked`), so a cache entry never runs unchecked; the cache only
saves the extraction. A runtime owns its cache; :meth:`ImageCache.clear` removes the trees.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from runtime.image._errors import EifError, EifSignatureError, ImageTamperedError
from runtime.image._read import EifFile, read_eif
from runtime.image._unpacked import (
    UnpackedImage,
    load_unpacked,
    remove_unpacked,
    unpack_eif,
    verify_unpacked,
)

__all__ = ["ImageCache"]

#: What identifies an EIF file on disk: real path, device, inode, size, mtime, ctime.
_FileKey = tuple[str, int, int, int, int, int]


class ImageCache:
    """Verified unpacked images keyed by PCR0, under ``directory`` (thread-safe)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._lock = threading.Lock()
        #: stat key of an EIF file -> (its verified tree, its parsed EifFile, immutable)
        self._by_path: dict[_FileKey, tuple[UnpackedImage, EifFile]] = {}

    def get(self, eif: EifFile, *, defer_verify: bool = False) -> tuple[UnpackedImage, bool]:
        """``(tree, verified)`` for ``eif`` (called from worker threads).

        A fresh extraction is always verified here. With ``defer_verify`` a cached tree is
        returned unverified (``verified=False``): the caller must :meth:`verify` it before
        anything of the enclave's image runs or attests (the zygote path gates the heartbeat
        echo and the NSM on it).
        """
        with self._lock:
            return self._get(eif, defer_verify)

    def verify(self, eif: EifFile, image: UnpackedImage) -> None:
        """Re-check a cached tree against ``eif`` (E36 ImageTamperedError on any difference)."""
        verify_unpacked(eif, image)

    @staticmethod
    def _path_key(path: str) -> _FileKey:
        st = os.stat(path)
        return (
            os.path.realpath(path),
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )

    def lookup(self, path: str) -> tuple[UnpackedImage, EifFile] | None:
        """The tree and image last verified for the EIF file at ``path``, if the file looks
        unchanged (stat). Only a hint: :meth:`verify_fresh` must confirm it."""
        try:
            key = self._path_key(path)
        except OSError:
            return None
        with self._lock:
            return self._by_path.get(key)

    def remember(self, path: str, eif: EifFile, image: UnpackedImage) -> None:
        """Record that ``image`` was verified for the file at ``path`` as it is now."""
        with contextlib.suppress(OSError), self._lock:
            self._by_path[self._path_key(path)] = (image, eif)

    def verify_fresh(self, path: str, expected: EifFile, image: UnpackedImage) -> None:
        """Verify the tree byte for byte against the image the start was prepared with
        (``expected``, parsed when the file had the same inode, size, mtime and ctime as now);
        if the file changed since, re-read it (CRC, measurements, signature) and require the
        same measurements.

        Raises:
            EifFormatError (E35), ImageTamperedError (E36), EifSignatureError (E59).
        """
        try:
            entry = self._by_path.get(self._path_key(path))
            same_file = entry is not None and entry[1] is expected
        except OSError:
            same_file = False
        if same_file:
            verify_unpacked(expected, image)
            return
        eif = read_eif(Path(path))
        if eif.is_signed and not eif.signature_ok:
            raise EifSignatureError("EIF signature check failed")
        if {i: bytes(v) for i, v in eif.pcrs.items()} != {
            i: bytes(v) for i, v in expected.pcrs.items()
        }:
            raise ImageTamperedError("Enclave boot failed: the EIF changed while starting")
        verify_unpacked(eif, image)

    def _get(self, eif: EifFile, defer_verify: bool) -> tuple[UnpackedImage, bool]:
        key = eif.pcrs[0].hex()[:32]
        root = self.dir / key
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if root.exists():
            try:
                image = load_unpacked(root)
                if defer_verify:
                    return image, False
                verify_unpacked(eif, image)
                return image, True
            except EifError:
                remove_unpacked(root)
        image = unpack_eif(eif, root)
        verify_unpacked(eif, image)
        return image, True

    def clear(self) -> None:
        """Remove every tree (and the directory, and the shared ``images/`` when empty)."""
        if self.dir.exists():
            for child in self.dir.iterdir():
                with contextlib.suppress(OSError):
                    if child.is_dir():
                        remove_unpacked(child)
                    else:
                        child.unlink()
            with contextlib.suppress(OSError):
                self.dir.rmdir()
                self.dir.parent.rmdir()  # the shared images/ dir, when no other runtime uses it
