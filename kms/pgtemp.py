"""A throwaway PostgreSQL cluster on loopback: for the tests, the benchmarks and trying the KMS
daemon's ``--storage postgresql://...`` out without an existing server.

:class:`TempPostgres` runs Debian's (or any) PostgreSQL binaries: ``initdb`` into a fresh
temporary directory, then ``postgres`` on a free loopback port, with password authentication
(SCRAM) for its superuser, so that a wrong password is refused as on a real server. PostgreSQL
refuses to run as root: as root the cluster's files belong to, and the server runs as, the
unprivileged ``nobody`` (its socket directory lives inside the cluster's directory, which it
owns). :meth:`TempPostgres.stop` ends the server and :meth:`TempPostgres.cleanup` removes every
file; the server is asked to die with the process that started it (``PR_SET_PDEATHSIG``), so an
interrupted test run leaves no server behind. Linux sends that signal when the *thread* that
started the server exits: call :meth:`TempPostgres.start` from a thread that outlives the
server (the main thread), not from a pool's worker thread.

Not for production data: ``fsync`` may be turned off (the tests' choice: they kill daemons,
never the machine).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import KmsError

__all__ = ["PostgresUnavailable", "TempPostgres", "find_postgres_bin"]

#: The unprivileged account the server runs as when we are root (it refuses root).
_SERVER_USER = "nobody"
#: initdb + start take 1-3 s here; a loaded machine gets more.
_START_TIMEOUT_S = 60.0
_PR_SET_PDEATHSIG = 1


class PostgresUnavailable(KmsError):
    """No PostgreSQL server binaries here (``str()`` says what is missing and how to get it)."""


def find_postgres_bin() -> Path:
    """The directory holding ``initdb`` and ``postgres``: on PATH, else Debian's
    ``/usr/lib/postgresql/<major>/bin`` (the newest).

    Raises:
        PostgresUnavailable: neither is installed.
    """
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("postgres") is not None:
        return Path(initdb).resolve().parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    raise PostgresUnavailable(
        "PostgreSQL is not installed (no initdb/postgres on PATH nor in /usr/lib/postgresql): "
        "apt-get install postgresql (scripts/test does it as root)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)


class TempPostgres:
    """One temporary cluster; use as a context manager or call :meth:`start`, :meth:`stop`,
    :meth:`cleanup`.

    Args:
        fsync: the server's ``fsync`` setting (off: faster, not crash-safe for the machine).
        user: the database superuser's name.
    """

    def __init__(self, *, fsync: bool = True, user: str = "enclave") -> None:
        self.bin = find_postgres_bin()
        self.fsync = fsync
        self.user = user
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as: pwd.struct_passwd | None = (
            pwd.getpwnam(_SERVER_USER) if os.geteuid() == 0 else None
        )

    # ------------------------------------------------------------ paths and URLs

    @property
    def root(self) -> Path:
        assert self._root is not None, "not initialised"
        return self._root

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def passfile(self) -> Path:
        """A libpq password file (mode 0600) for this cluster's superuser."""
        return self.root / "pgpass"

    def url(self, database: str = "postgres", *, password: bool = False) -> str:
        """``postgresql://user@127.0.0.1:port/database``; the password only when asked (the
        recommended way is :attr:`passfile` through ``PGPASSFILE``)."""
        auth = f"{self.user}:{self.password}" if password else self.user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        """Environment entries that let libpq clients authenticate (``PGPASSFILE``)."""
        return {"PGPASSFILE": str(self.passfile)}

    # ------------------------------------------------------------ life cycle

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def _run(self, argv: list[str]) -> None:
        kwargs: dict[str, object] = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}
        done = subprocess.run(
            argv,
            capture_output=True,
            cwd=self.root,
            timeout=_START_TIMEOUT_S,
            **kwargs,  # type: ignore[call-overload]
        )
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {out}")

    def init(self) -> None:
        """``initdb`` into a fresh directory (SCRAM password authentication, UTF-8)."""
        self._root = Path(tempfile.mkdtemp(prefix="enclave-pg-"))
        self._chown(self.root)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        pwfile.chmod(0o600)
        self.socket_dir.mkdir(mode=0o700)
        self._chown(self.socket_dir)
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--pwfile",
                str(pwfile),
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        self.passfile.write_text(f"127.0.0.1:*:*:{self.user}:{self.password}\n")
        self.passfile.chmod(0o600)

    def start(self) -> None:
        """Start the server (initialising the cluster first if needed) and wait until it
        accepts connections. The port is chosen once and kept across restarts."""
        if self._root is None:
            self.init()
        if not self.port:
            self.port = _free_port()
        kwargs: dict[str, object] = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._chown(self.log_path)
        try:
            self._proc = subprocess.Popen(  # type: ignore[call-overload]
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"port={self.port}",
                    "-c",
                    f"unix_socket_directories={self.socket_dir}",
                    "-c",
                    f"fsync={'on' if self.fsync else 'off'}",
                    "-c",
                    "max_connections=200",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.root,
                preexec_fn=_die_with_parent,
                **kwargs,
            )
        finally:
            os.close(log)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited ({self._proc.returncode}): {self.server_log()[-2000:]}"
                )
            try:
                psycopg.connect(self.url(password=True), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres did not accept connections: {self.server_log()[-2000:]}"
                    ) from None
                time.sleep(0.05)

    def server_log(self) -> str:
        """The server's log so far (diagnostics)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (SIGINT: sessions are ended, a clean shutdown) or
        ``immediate`` (SIGQUIT: as after a crash; the next start recovers from the WAL)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def create_database(self, name: str) -> str:
        """Create database ``name`` (owned by the superuser); returns its URL (no password)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url(password=True), autocommit=True, connect_timeout=10) as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def cleanup(self) -> None:
        """Stop the server and remove every file of the cluster."""
        self.stop()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> TempPostgres:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
