"""Errors of the reference client. Each carries a one-line, user-facing reason and a process exit status."""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "FolderRefused",
    "Interrupted",
    "NoSuchFolder",
    "ProtocolError",
    "ServerRefused",
    "ServerUnavailable",
    "StaleFolder",
    "StoreBusy",
    "StoreError",
    "TLSError",
    "Unsupported",
]


class ClientError(Exception):
    """Base class: ``str(error)`` is a one-line reason; ``exit_status`` is what the CLI exits with."""

    exit_status = 1

    def __str__(self) -> str:
        # One line, whatever the server or the OS put in the message.
        return " ".join(super().__str__().split())


class ConnectError(ClientError):
    """The server cannot be reached (refused, unreachable, name does not resolve, timed out)."""

    exit_status = 3


class TLSError(ConnectError):
    """TLS could not be established: certificate not trusted, name mismatch, no STARTTLS offered."""


class ConnectionLost(ConnectError):
    """An established connection broke (EOF, reset, timeout, BYE)."""


class ServerUnavailable(ConnectError):
    """The server refused the login for now, not the credentials: ``NO [UNAVAILABLE]`` (e.g. the proxy's
    backend is restarting), ``[INUSE]``, ``[LIMIT]`` (RFC 5530). Retried like an unreachable server."""


class AuthenticationError(ClientError):
    """The server refused the credentials. Not retried: retrying a wrong password only locks accounts."""

    exit_status = 4


class ServerRefused(ClientError):
    """The server answered a command with NO or BAD."""

    exit_status = 5


class Unsupported(ServerRefused):
    """The server lacks a capability an operation needs (e.g. XCPM-LOCALDELETE for a local delete)."""


class NoSuchFolder(ServerRefused):
    """A folder named on the command line exists neither on the server nor locally (``missing``: those)."""

    def __init__(self, message: str, *, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing


class FolderRefused(ServerRefused):
    """The server would not open one folder during a sync. ``gone``: because it no longer exists (deleted
    or renamed by someone else since the folder list was taken)."""

    def __init__(self, message: str, *, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


class StaleFolder(ServerRefused):
    """The server's copy of a folder is another one than the local copy's (a new UIDVALIDITY): UIDs taken
    from the local copy would name other messages. A sync first."""


class ProtocolError(ConnectionLost):
    """The server sent something that is not IMAP; the connection cannot be trusted any more."""


class StoreError(ClientError):
    """The local store cannot be used (permissions, disk full, belongs to another account, locked)."""

    exit_status = 6


class StoreBusy(StoreError):
    """Another process holds the store's lock (a temporary condition: ``watch`` waits for it)."""


class Interrupted(ClientError):
    """Stopped by SIGINT/SIGTERM. Everything committed so far is kept; the next run resumes."""

    exit_status = 130
