"""A fault-injecting TCP proxy on loopback, in front of a real server (the tests' moto_server).

Modes, switchable at run time with ``proxy.set(mode, ...)``:

- ``pass``: bytes flow both ways untouched.
- ``refuse``: the listening socket is closed (a connect is refused) and every open connection
  is reset, as when the server goes down; leaving the mode listens again on the same port.
- ``reset``: a connection is reset (RST) once it has sent ``after`` bytes back to the client.
- ``stall``: connections are accepted, but nothing is forwarded while the mode lasts.
- ``slow``: bytes back to the client are throttled to ``rate`` bytes/s.

Threads only; every loop waits with a timeout, and ``close()`` ends them all.
"""

import select
import socket
import struct
import threading
import time
from contextlib import suppress

CHUNK = 16384
TICK = 0.05


def _rst(sock: socket.socket) -> None:
    """Close with a TCP reset rather than a FIN."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with suppress(OSError):
        sock.close()


class FaultProxy:
    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.mode, self.after, self.rate = "pass", 0, 0.0
        self.connections = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> None:
        # A closed listener stays bound while the accept thread's select still holds it.
        deadline = time.monotonic() + 5
        while True:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(TICK)
        sock.listen(64)
        self._listener = sock

    def set(self, mode: str, *, after: int = 0, rate: float = 0.0) -> None:
        assert mode in ("pass", "refuse", "reset", "stall", "slow"), mode
        with self._lock:
            self.mode, self.after, self.rate = mode, after, rate
            if mode == "refuse":
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                for sock in list(self._open):
                    _rst(sock)
                self._open.clear()
            elif self._listener is None:
                self._listen(self.port)

    def fault_for(self, mode: str, seconds: float, **kwargs) -> threading.Timer:
        """Sets ``mode`` now and ``pass`` after ``seconds``, in the background."""
        self.set(mode, **kwargs)
        timer = threading.Timer(seconds, self.set, ("pass",))
        timer.daemon = True
        timer.start()
        return timer

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for sock in list(self._open):
                _rst(sock)
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            listener = self._listener
            if listener is None:
                time.sleep(TICK)
                continue
            try:
                ready, _, _ = select.select([listener], [], [], TICK)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):
                continue  # closed under us by set("refuse")
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _rst(client)
            return
        with self._lock:
            if self.mode == "refuse":
                _rst(client)
                upstream.close()
                return
            self._open.update((client, upstream))
            self.connections += 1
        sent_back, reset = 0, True
        try:
            while not self._closed.is_set():
                if self.mode == "stall":
                    time.sleep(TICK)
                    continue
                try:
                    ready, _, _ = select.select([client, upstream], [], [], TICK)
                except (OSError, ValueError):
                    return
                for src in ready:
                    dst = upstream if src is client else client
                    limit = CHUNK
                    if src is upstream and self.mode == "slow" and self.rate:
                        limit = max(1, int(self.rate * TICK))
                    data = src.recv(limit)
                    if not data:
                        reset = False  # an orderly close: pass it on as one
                        return
                    if src is upstream:
                        if self.mode == "reset" and sent_back + len(data) > self.after:
                            dst.sendall(data[: max(0, self.after - sent_back)])
                            return  # the finally resets both ends
                        if self.mode == "slow" and self.rate:
                            time.sleep(len(data) / self.rate)
                        sent_back += len(data)
                    dst.sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(client)
                self._open.discard(upstream)
            for sock in (client, upstream):
                if reset:
                    _rst(sock)
                else:
                    with suppress(OSError):
                        sock.close()
