"""A minimal websocket listener for ComfyUI's /ws (standard library only; the live tests need no client package).

It records every JSON text message the server sends, as the page's ``api`` object receives them, so a test can
check what the web extension would have shown (e.g. the Downloader panel's final "cancelled").
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import threading
import time
from typing import Any


class ComfyEvents:
    """Connect to ``ws://host:port/ws?clientId=...`` and collect messages in a background thread."""

    def __init__(self, host: str, port: int, client_id: str, timeout: float = 30.0) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self._sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _read(self) -> None:
        try:
            while True:
                first, second = self._exact(2)
                opcode, length = first & 0x0F, second & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._exact(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._exact(8))[0]
                payload = self._exact(length)  # server frames are never masked
                if opcode == 8:
                    return
                if opcode == 1:
                    with self._lock:
                        self.messages.append(json.loads(payload))
        except (OSError, ConnectionError, ValueError):
            return

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [m.get("data", {}) for m in self.messages if m.get("type") == kind]

    def wait_for(self, kind: str, predicate: Any, timeout: float = 30.0) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for data in self.of_type(kind):
                if predicate(data):
                    return data
            time.sleep(0.1)
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
