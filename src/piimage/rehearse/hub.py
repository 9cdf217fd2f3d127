"""The rehearsal's virtual Ethernet: a hub in this process on 127.0.0.1 that QEMU's socket
netdevs connect to, forwarding each frame to the other nodes only — nothing reaches any other
network, and no root-only network setup is needed."""

from __future__ import annotations

import selectors
import socket
import struct
import threading


class Hub:
    """An Ethernet hub for QEMU's `-netdev socket,connect=`: frames arrive as a 4-byte
    big-endian length and the frame; each goes to every other connected port."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._bufs: dict[socket.socket, bytearray] = {}
        self._stop = threading.Event()
        self.frames = 0
        self._thread = threading.Thread(target=self._serve, name="rehearsal-hub", daemon=True)

    def __enter__(self) -> Hub:
        self._sel.register(self.listener, selectors.EVENT_READ)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in list(self._bufs):
            s.close()
        self.listener.close()
        self._sel.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.2):
                s = key.fileobj
                if s is self.listener:
                    conn, _ = self.listener.accept()
                    conn.setblocking(True)
                    conn.settimeout(5)
                    self._bufs[conn] = bytearray()
                    self._sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = s.recv(262144)
                except OSError:
                    data = b""
                if not data:
                    self._drop(s)
                    continue
                buf = self._bufs[s]
                buf.extend(data)
                while len(buf) >= 4:
                    (n,) = struct.unpack(">I", buf[:4])
                    if len(buf) < 4 + n:
                        break
                    frame = bytes(buf[: 4 + n])
                    del buf[: 4 + n]
                    self.frames += 1
                    for other in list(self._bufs):
                        if other is not s:
                            try:
                                other.sendall(frame)
                            except OSError:
                                self._drop(other)

    @property
    def connected(self) -> int:
        return len(self._bufs)

    def _drop(self, s: socket.socket) -> None:
        if s in self._bufs:
            del self._bufs[s]
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
