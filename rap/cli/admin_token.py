"""The admin token `rap serve` runs with: from a file or the environment, else generated and
kept in a file of this server's own, named by its port.

One file per port, because every server on the machine used to rewrite one shared file: a
second `rap serve` (or a test beside a running one) left the path the first had printed
holding the second's token. Two servers cannot listen on one port, so the port names the
instance; `check_port_free` runs before the file is written, so a server that could not start
never overwrites the token of the one that holds the port.
"""

from __future__ import annotations

import errno
import os
import secrets
import shlex
import socket
from pathlib import Path

from rap.cli.common import read_secret
from rap.core.errors import RapError


def admin_token_path(port: int) -> Path:
    """Where `rap serve --port PORT` keeps a token it generated:
    $XDG_CACHE_HOME/rap/admin-token-PORT, else ~/.cache/rap/admin-token-PORT (the XDG spec
    ignores a relative XDG_CACHE_HOME). Not `$RAP_CACHE_DIR`: that holds converted models,
    which servers and test runs share on purpose."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return base / "rap" / f"admin-token-{port}"


def write_admin_token(token: str, port: int) -> Path:
    """Write `token` to admin_token_path(port), readable by its owner only; return the path."""
    path = admin_token_path(port)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created 0600 (never briefly wider); fchmod narrows a file left by an older run.
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(token + "\n")
    except OSError as exc:
        raise RapError(
            f"cannot write the admin token to {path} ({exc.strerror})",
            fix="set RAP_ADMIN_TOKEN or pass --admin-token-file, or set XDG_CACHE_HOME",
        ) from None
    return path


def admin_token(path: str | None, env: str, port: int) -> tuple[str, tuple[str, str]]:
    """The admin token, and what `rap serve` prints about it: where it is, and the `rap budget
    set` flag that finds it (neither line holds the token, so a pasted log leaks nothing)."""
    token = read_secret(path, env, "admin token")
    if token and path:
        full = os.path.abspath(path)  # the hint may be pasted in another folder
        return token, (f"from {full}", f" --token-file {shlex.quote(full)}")
    if token:  # a shell comment, so the line still pastes as it is
        return token, (f"from ${env}", f"  # the token from ${env}")
    token = secrets.token_urlsafe(16)
    written = str(write_admin_token(token, port))
    return token, (f"in {written} (readable by you only)", f" --token-file {shlex.quote(written)}")


def check_port_free(host: str, port: int) -> None:
    """A RapError when something already listens on host:port (another `rap serve`, most
    likely). SO_REUSEADDR, as the server's own socket has it: a port that a stopped server
    left in TIME_WAIT counts as free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise RapError(
                    f"cannot listen on {host}:{port} ({exc.strerror})",
                    fix="pass --host with an address of this machine and --port with a free port",
                ) from None
            raise RapError(
                f"port {port} on {host} is in use (another rap serve?)",
                fix="stop that server, or pass --port with a free port",
            ) from None
