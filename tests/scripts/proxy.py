"""A TCP forwarder that can cut a service off for a while: an outage without losing its state.

Stopping moto's S3 server would drop every bucket it holds; putting this in
front of it and pausing the forwarder makes the store unreachable (open
connections reset, new ones refused) and then reachable again, as a restarted
or partitioned object store looks to a client.
"""

from __future__ import annotations

import socket
import threading
import time


class PausableProxy:
    """Forward 127.0.0.1:<port> to 127.0.0.1:<target_port>; `pause` cuts it off, `resume` reconnects."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._resume_at = 0.0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def paused(self) -> bool:
        return time.monotonic() < self._resume_at

    def pause(self, seconds: float = float("inf")) -> None:
        """Reset every open connection and refuse new ones for `seconds` (default: until `resume`)."""
        self._resume_at = time.monotonic() + seconds
        with self._lock:
            for s in list(self._open):
                _hard_close(s)
            self._open.clear()

    def resume(self) -> None:
        """Forward new connections again."""
        self._resume_at = 0.0

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.paused:
                _hard_close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _hard_close(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._open.discard(source)


def _hard_close(s: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a vanished peer looks."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    s.close()
