"""Test helpers on the wire itself: a TCP tap that records what a client sends (what an
eavesdropper on the network holds), ZMTP 3 framing by hand (what a fuzzer or a replayer sends
without a ZeroMQ library deciding for it), and a process's resident memory."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class TcpTap:
    """A relay on a free loopback port in front of 127.0.0.1:`target`; `streams` holds the bytes
    each client sent, one bytearray per connection, in order of arrival."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(0.2)
        self.port = self.srv.getsockname()[1]
        self.streams: list[bytearray] = []
        self.closed = False
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.srv.accept()
            except (socket.timeout, OSError):
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                conn.close()
                continue
            rec = bytearray()
            self.streams.append(rec)
            self.conns += [conn, up]
            threading.Thread(target=self._pump, args=(conn, up, rec), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rec: bytearray | None) -> None:
        try:
            while data := src.recv(1 << 16):
                if rec is not None:
                    rec += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        for s in [self.srv, *self.conns]:
            s.close()


def replay(port: int, data: bytes, hold_s: float = 0.3) -> None:
    """Play recorded bytes into a fresh connection, as an attacker with the recording would: the
    greeting first, as the recorded client sent it (libzmq 4.3 fails a handshake whose first
    command comes in the greeting's segment), then the rest."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data[:GREETING_LEN])
        time.sleep(0.05)
        s.sendall(data[GREETING_LEN:])
        time.sleep(hold_s)  # let the receiver read it all before the connection goes


# -- ZMTP 3 by hand (rfc.zeromq.org/spec/23) --

GREETING_LEN = 64


def greeting(mechanism: bytes = b"NULL", as_server: bool = False) -> bytes:
    return b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + mechanism.ljust(20, b"\0") + bytes([as_server]) + b"\0" * 31


def frame(body: bytes, more: bool = False, command: bool = False, size: int | None = None) -> bytes:
    """One ZMTP frame; size: the length to announce (a lie when it differs from len(body))."""
    n = len(body) if size is None else size
    flags = (1 if more else 0) | (4 if command else 0)
    if n > 255:
        return bytes([flags | 2]) + n.to_bytes(8, "big") + body
    return bytes([flags, n]) + body


def ready(socket_type: bytes) -> bytes:
    """The NULL mechanism's READY command naming our socket type."""
    prop = bytes([len(b"Socket-Type")]) + b"Socket-Type" + len(socket_type).to_bytes(4, "big") + socket_type
    return frame(bytes([5]) + b"READY" + prop, command=True)


def messages(stream: bytes) -> list[list[bytes]]:
    """The messages in a recorded client stream of the NULL mechanism (greeting and commands skipped)."""
    pos, out, cur = GREETING_LEN, [], []
    while pos < len(stream):
        flags = stream[pos]
        if flags & 2:
            n, pos = int.from_bytes(stream[pos + 1:pos + 9], "big"), pos + 9
        else:
            n, pos = stream[pos + 1], pos + 2
        body, pos = bytes(stream[pos:pos + n]), pos + n
        if len(body) < n:
            break
        if flags & 4:
            continue
        cur.append(body)
        if not flags & 1:
            out.append(cur)
            cur = []
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory now (VmRSS), not the high-water mark."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
