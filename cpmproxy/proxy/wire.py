"""Writing relay output: straight to the socket when nothing is queued ahead of it.

Twisted's ``write`` only queues: the bytes go out on the next reactor iteration, after an epoll_ctl to
watch for writability, a poll, a ``b"".join`` of the queue and another epoll_ctl. For a relay that is
half of its cost per command (ping-pong) and a copy of every byte (bulk). When a plain TCP transport
has nothing buffered, ``send_chunks`` hands the chunks to the kernel at once in one ``sendmsg``
(gather-write, no join); whatever the kernel does not take goes through Twisted's normal queue, which
keeps ordering, backpressure (producer pausing) and error handling exactly as before.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp

__all__ = ["adapt_read_size", "send_chunks"]

# Bound once: twisted.internet.tcp is a deprecation-proxy module (two Python calls per attribute read).
_PLAIN_TCP = (tcp.Server, tcp.Client)
_MAX_IOV = 512  # sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call


def _direct_socket(transport) -> socket.socket | None:
    """The socket to write to directly, or None when the transport must do it (TLS, queued output,
    closing)."""
    if type(transport) not in _PLAIN_TCP or transport.TLS:
        return None
    if not transport.connected or transport.disconnecting or transport._writeDisconnected:
        return None
    if transport.offset != len(transport.dataBuffer) or transport._tempDataBuffer:
        return None  # earlier bytes are still queued: these must wait behind them
    return transport.socket


def send_chunks(transport, chunks: list) -> None:
    """Write ``chunks`` (bytes or memoryviews) to ``transport``, in order."""
    sock = _direct_socket(transport)
    if sock is not None:
        try:
            if len(chunks) == 1:
                sent = sock.send(chunks[0])
            elif len(chunks) <= _MAX_IOV:
                sent = sock.sendmsg(chunks)
            else:
                sent = sock.send(b"".join(chunks))
        except OSError:
            sent = 0  # EAGAIN, or an error Twisted's own write path will report
        if sent:
            chunks = _after(chunks, sent)
            if not chunks:
                return
    transport.writeSequence([bytes(c) if type(c) is memoryview else c for c in chunks])


def _after(chunks: list, sent: int) -> list:
    """What is left of ``chunks`` once ``sent`` bytes of them went out."""
    for i, c in enumerate(chunks):
        n = len(c)
        if sent < n:
            rest = chunks[i:]
            if sent:
                rest[0] = memoryview(c)[sent:]
            return rest
        sent -= n
    return []


_MIN_READ = 1 << 16  # Twisted's default
_MAX_READ = 1 << 20


def adapt_read_size(transport, n: int) -> None:
    """After a read of ``n`` bytes: double the transport's read size while reads fill it (a bulk FETCH
    arrives faster than 64 KiB per reactor wake-up, and each wake-up has a fixed cost), back to 64 KiB
    once they are small again (every read allocates its full size, which glibc hands back to the OS at
    once: a 1 MiB buffer made each ping-pong read cost 3x more). Twisted also uses the value as the size
    of the write queue above which a registered producer is paused."""
    size = transport.bufferSize
    if n >= size:
        if size < _MAX_READ:
            transport.bufferSize = size * 2
    elif size > _MIN_READ and n < size >> 4:
        transport.bufferSize = _MIN_READ
