"""A real TCP server that answers its health checks like vLLM's server and never answers a generation request
(standard library only: the TRL probe under benchmarks/ uses it from the vLLM venv too)."""

from __future__ import annotations

import json
import socket
import threading


class StuckServer:
    """Answers ``GET /health`` and ``GET /v1/models`` like vLLM's server, and keeps every POST unanswered."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.posts = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        while True:
            try:
                head = conn.recv(65536).decode(errors="replace")
            except OSError:
                return
            if not head:
                return
            if head.startswith("POST"):
                self.posts += 1
                self.held.append(conn)  # read, never answered
                return
            body = json.dumps({"data": [{"id": "policy"}]} if "/v1/models" in head else {}).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()
