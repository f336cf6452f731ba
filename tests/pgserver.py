"""A throwaway real PostgreSQL cluster for the tests and CI (no mocks: the server binaries themselves).

Used two ways:

- from Python: ``server = start()`` ... ``server.stop()`` (tests/conftest.py does this once per
  pytest session when no server is given in ``WALSTATE_TEST_POSTGRES``);
- from a shell: ``python3 tests/pgserver.py start DIR`` prints the base URL of a new cluster whose
  files live in DIR, ``url DIR`` prints it again, ``stop DIR`` stops it and removes DIR
  (.ci/run does this, before the virtual environment exists).

``start(watchdog=True)`` (what the test session uses) ties the cluster to the process that started
it, however that process ends (SIGKILL included): a small watchdog process (``pgserver.py watch
DIR``, in a session of its own) holds the read end of a pipe whose write end only the starter
holds, and stops the cluster and removes DIR when the pipe reaches end-of-file (the kernel closes
the starter's end when it dies) or when the watchdog finds itself re-parented.

Only the standard library is used (the server is driven by ``initdb``, ``pg_ctl`` and ``pg_isready``),
so the system ``python3`` can run it without psycopg.

The cluster listens on 127.0.0.1 only, on a free port, with its Unix socket in its own data
directory, and trusts local connections for the superuser ``walstate``: the URL is
``postgresql://walstate@127.0.0.1:PORT/postgres``. PostgreSQL refuses to run as root, so when the
tests run as root the server runs as ``postgres`` (or ``nobody``) through ``runuser``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pwd
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: The cluster's superuser (initdb -U): the tests connect as it, with trust authentication.
SUPERUSER = "walstate"

#: Settings of the test server, appended to its postgresql.conf.
#: fsync and full_page_writes are off for speed only: the tests exercise walstate's own
#: guarantees (transactions, locks, claims, crash recovery of walstate's processes), not
#: PostgreSQL's durability after a power loss, and a killed *client* process never loses a
#: committed transaction either way. The benchmarks start their own server with the defaults.
TEST_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    # Many processes x threads in the multi-process tests each hold a connection.
    "max_connections": "200",
    "fsync": "off",
    "full_page_writes": "off",
}

#: Settings of a durable server (``start(durable=True)``, for the benchmarks): fsync and
#: full_page_writes keep PostgreSQL's defaults (on), and every commit waits for its WAL flush.
DURABLE_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "synchronous_commit": "on",
}


class ServerError(RuntimeError):
    """The PostgreSQL server binaries are missing, or the cluster could not be created or started."""


def find_bindir() -> Path | None:
    """The directory of initdb/pg_ctl/pg_isready: ``pg_config --bindir``, Debian's layout, then PATH."""

    def complete(d: Path) -> bool:
        return all((d / tool).is_file() and os.access(d / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "pg_isready"))

    candidates: list[Path] = []
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=30)
            candidates.append(Path(out.stdout.strip()))
        except (subprocess.SubprocessError, OSError):
            pass
    # Debian installs the server outside PATH, one directory per major version: newest first.
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: _major(Path(p).parent.name), reverse=True)
    candidates += [Path(p) for p in debian]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(os.path.realpath(initdb)).parent)
    return next((d for d in candidates if complete(d)), None)


def _major(name: str) -> int:
    return int(name) if name.isdigit() else -1


def scratch_parent() -> str:
    """Where new clusters go: /dev/shm (RAM) when it has room, else the usual temporary directory.

    Creating a database writes a copy of its template (~8 MB): ~10 ms in RAM against ~200 ms on
    this machine's busy disk, paid by every PostgreSQL test (each gets a new database). Nothing
    of a throwaway cluster needs to survive a reboot.
    """
    try:
        st = os.statvfs("/dev/shm")
        if os.access("/dev/shm", os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= 1 << 30:
            return "/dev/shm"
    except OSError:
        pass
    return tempfile.gettempdir()


def _server_user() -> str | None:
    """Who runs the server: None (ourselves) unless we are root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ServerError("running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL as")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Server:
    """A running throwaway cluster: its base URL, and where its files are."""

    root: Path
    port: int
    bindir: Path
    user: str | None
    #: With ``start(watchdog=True)``: the write end of the watchdog's pipe, and the watchdog.
    watchdog_fd: int | None = None
    watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the ``postgres`` maintenance database, as the superuser."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def stop(self) -> None:
        """Stop the server (immediate: its data is thrown away) and remove its directory."""
        stop(self.root)
        if self.watchdog_fd is not None and self.watchdog is not None:
            fd = self.watchdog_fd
            object.__setattr__(self, "watchdog_fd", None)  # once: the number may name another file later
            os.close(fd)  # the watchdog sees end-of-file, finds nothing left to stop, and exits
            try:
                self.watchdog.wait(60)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()


def _run(user: str | None, bindir: Path, tool: str, *args: str, cwd: Path, timeout: float = 120) -> None:
    cmd = [str(bindir / tool), *args]
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    # cwd: the server user may not be allowed into ours (for example /root).
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ServerError(f"{tool} failed (exit {proc.returncode}): {proc.stdout}{proc.stderr}".strip())


def start(root: str | Path | None = None, *, settings: dict[str, str] | None = None, durable: bool = False,
          timeout: float = 60, watchdog: bool = False) -> Server:
    """Create and start a new cluster in ``root`` (a new temporary directory if None); return it running.

    ``root`` must not exist yet or be empty, and the server's user must be able to reach it (its
    parent directories searchable); None makes a new one in :func:`scratch_parent`, or on disk when
    ``durable``. ``settings`` replace :data:`TEST_SETTINGS` (the port, the socket directory and
    listen_addresses are always set); ``durable`` uses :data:`DURABLE_SETTINGS` instead (fsync on,
    ``synchronous_commit=on``: what the benchmarks measure against). Raises :class:`ServerError` with the server's
    log when something fails; nothing is left running then. ``watchdog`` stops the cluster when the
    calling process dies, however it dies (see the module docstring).
    """
    bindir = find_bindir()
    if bindir is None:
        raise ServerError("no PostgreSQL server binaries (initdb, pg_ctl): install Debian's `postgresql` package")
    user = _server_user()
    # A durable server's WAL flushes must reach a disk: /dev/shm would make fsync free.
    parent = tempfile.gettempdir() if durable else scratch_parent()
    base = Path(tempfile.mkdtemp(prefix="walstate-pg-", dir=parent)) if root is None else Path(root)
    base.mkdir(parents=True, exist_ok=True)
    if any(base.iterdir()):
        raise ServerError(f"{base}: not empty; give a new directory for the cluster")
    base.chmod(0o700)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    server: Server | None = None
    try:
        data = base / "data"
        # --locale=C: byte-wise collation, the same order as SQLite's default, and no
        # dependence on which locales the machine has; -A trust: local test server only.
        _run(user, bindir, "initdb", "-D", str(data), "-A", "trust", "-U", SUPERUSER, "--no-sync",
             "-E", "UTF8", "--locale=C", cwd=base)
        # A port can be taken between choosing it and the server binding it: try a few.
        last: ServerError | None = None
        for _ in range(5):
            port = _free_port()
            default = DURABLE_SETTINGS if durable else TEST_SETTINGS
            conf = dict(default if settings is None else settings)
            conf.update(listen_addresses="'127.0.0.1'", port=str(port), unix_socket_directories=f"'{data}'")
            # Later lines win in postgresql.conf, so a restart keeps the same settings.
            with open(data / "postgresql.conf", "a", encoding="utf-8") as f:
                f.write("\n# walstate tests (tests/pgserver.py)\n")
                f.writelines(f"{k} = {v}\n" for k, v in conf.items())
            try:
                _run(user, bindir, "pg_ctl", "start", "-D", str(data), "-l", str(base / "server.log"), "-w",
                     "-t", str(int(timeout)), cwd=base, timeout=timeout + 30)
            except ServerError as exc:
                last = exc
                continue
            server = Server(base, port, bindir, user)
            break
        if server is None:
            raise ServerError(f"{last}\n{_log_tail(base)}")
        _wait_ready(server, time.monotonic() + timeout)
        (base / "url").write_text(server.url + "\n", encoding="utf-8")
        (base / "bindir").write_text(str(bindir) + "\n", encoding="utf-8")
        if watchdog:
            server = _watch(server)
        return server
    except BaseException:
        stop(base)
        raise


def _watch(server: Server) -> Server:
    """``server`` with a watchdog process that stops it once this process is gone."""
    read, write = os.pipe()  # not inheritable: no other child of ours holds the write end
    try:
        # A session of its own: a signal to our process group (Ctrl-C, a CI runner's kill) does
        # not reach it before it has done its work.
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "watch", str(server.root)], stdin=read,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    return dataclasses.replace(server, watchdog_fd=write, watchdog=proc)


def watch(root: str | Path) -> None:
    """The watchdog: wait for end-of-file on stdin (or to be re-parented), then stop the cluster in ``root``."""
    parent = os.getppid()
    while True:
        ready, _, _ = select.select([0], [], [], 1.0)
        if ready:
            if not os.read(0, 4096):
                break  # the starter closed its end, or died (the kernel closed it)
        elif os.getppid() != parent:
            break  # the starter is gone (a forked child of it may still hold the pipe)
    stop(root)


def _wait_ready(server: Server, deadline: float) -> None:
    """Poll pg_isready until the server accepts connections on its TCP port."""
    while True:
        proc = subprocess.run(
            [str(server.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(server.port), "-U", SUPERUSER,
             "-d", "postgres", "-t", "2"],
            capture_output=True, timeout=30,
        )
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise ServerError(f"PostgreSQL on port {server.port} did not accept connections in time\n"
                              f"{_log_tail(server.root)}")
        time.sleep(0.05)  # polling the server's readiness, with the deadline above


def _log_tail(root: Path) -> str:
    try:
        lines = (root / "server.log").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no server log)"
    return "server log:\n" + "\n".join(lines[-20:])


def stop(root: str | Path) -> None:
    """Stop the cluster in ``root`` if it runs, and remove ``root``. Safe to call twice."""
    base = Path(root)
    data = base / "data"
    if (data / "postmaster.pid").exists():
        bindir_file = base / "bindir"
        bindir = Path(bindir_file.read_text().strip()) if bindir_file.exists() else find_bindir()
        if bindir is not None:
            try:
                _run(_server_user(), bindir, "pg_ctl", "stop", "-D", str(data), "-m", "immediate", "-w", cwd=base)
            except ServerError:
                pass  # already stopped (stale pid file): removing the directory is all that is left
    shutil.rmtree(base, ignore_errors=True)


def url(root: str | Path) -> str:
    """The base URL of the cluster started in ``root``."""
    return (Path(root) / "url").read_text(encoding="utf-8").strip()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop", "url", "watch"):
        print("usage: python3 tests/pgserver.py start|stop|url|watch DIR", file=sys.stderr)
        return 2
    command, root = argv
    try:
        if command == "start":
            print(start(root).url)
        elif command == "stop":
            stop(root)
        elif command == "watch":
            watch(root)
        else:
            print(url(root))
    except (ServerError, OSError) as exc:
        print(f"pgserver {command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
