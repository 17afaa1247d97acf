"""A small HTTP server of a shard folder for the tests, on loopback (or a test host's address),
that can cut a file's transfer short on purpose.

``ShardServer(folder).start()`` serves ``folder`` in a thread; ``server.url`` is its root;
``server.drop[name] = n`` cuts the next ``n`` transfers of ``name`` after half its bytes (the
headers promise them all, so the client sees a connection closed mid-file, as from a server
that went away); ``server.requests`` counts the GETs per file. ``python -m http_shards FOLDER
HOST PORT`` serves a folder until killed (for a test host's namespace).
"""

from __future__ import annotations

import functools
import socket
import sys
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    server_state: ShardServer

    def log_message(self, format, *args) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:
        name = self.path.lstrip("/").split("?")[0]
        state = self.server_state
        state.requests[name] += 1
        if state.drop.get(name, 0) > 0:
            state.drop[name] -= 1
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            outputfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().copyfile(source, outputfile)


class ShardServer:
    """Serves ``folder`` over HTTP on ``host`` (a free port unless given)."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", port: int = 0):
        self.folder, self.drop, self.requests = Path(folder), {}, Counter()
        handler = type("Handler", (_Handler,), {"server_state": self})
        self.httpd = ThreadingHTTPServer((host, port),
                                         functools.partial(handler, directory=str(folder)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ShardServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":
    server = ShardServer(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
    print("serving", server.url, flush=True)
    server.httpd.serve_forever()
