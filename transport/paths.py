"""Where enclave-runtime keeps per-user state, shared by every package.

The state directory holds the local CA, the vsock fabric's socket files, enclave records and the
KMS database when the daemons are started with defaults. It is chosen, in order, by the
``ENCLAVE_STATE_DIR`` environment variable, then ``$XDG_STATE_HOME/enclave-runtime``, then
``~/.local/state/enclave-runtime``. Directories are created with mode 0700: socket files and
keys inside must never be reachable by other users.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["STATE_DIR_ENV", "default_state_dir", "ensure_private_dir"]

#: Environment variable naming the state directory (as nitro-cli's NITRO_CLI_* paths).
STATE_DIR_ENV = "ENCLAVE_STATE_DIR"


def default_state_dir() -> Path:
    """Return the state directory this process should use (not created)."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return (base / "enclave-runtime").resolve()


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make sure only the owner can enter it.

    Raises:
        PermissionError: the directory exists but is owned by another user.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not by this user")
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path
