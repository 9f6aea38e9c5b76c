"""A stand-in for llama-server and `tinyllm-trio serve` in `bench compare`'s tests: a
process that answers /health, /v1/models and streamed /completion (llama-server's events) or
/v1/completions (OpenAI's), so the command's process handling runs for real without either.

    python stand_in_server.py PORT [--ignore-sigterm] [--exit-at-once] [--erase-log FILE]

With --erase-log it also takes llama-server's `POST /slots/{id}?action=erase`, writing each
path to FILE; without, it refuses them as llama-server does without --slot-save-path.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, b'{"status":"ok"}')
        elif self.path == "/v1/models":
            self._send(200, b'{"data":[{"id":"stand-in"}]}')
        else:
            self._send(404, b"{}")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.startswith("/slots/") and self.path.endswith("?action=erase"):
            if ERASE_LOG is None:  # as llama-server without --slot-save-path
                self._send(501, b'{"error":"This server does not support slots action."}')
                return
            with open(ERASE_LOG, "a") as log:
                log.write(self.path + "\n")
            self._send(200, b'{"n_erased":0}')
            return
        assert all(type(t) is int for t in body["prompt"]), "token-id prompts only"
        llama = self.path == "/completion"
        n = body["n_predict"] if llama else body["max_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = []
        for _ in range(n):
            if llama:
                events.append(b'data: {"content":" tok","stop":false}\n\n')
            else:
                events.append(b'data: {"choices":[{"index":0,"text":" tok"}]}\n\n')
        if llama:
            events.append(b'data: {"content":"","stop":true,"tokens_predicted":%d}\n\n' % n)
        else:
            events.append(b"data: [DONE]\n\n")
        for e in events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(e), e))
            time.sleep(0.0005)
        self.wfile.write(b"0\r\n\r\n")


ERASE_LOG: str | None = None


def main() -> None:
    global ERASE_LOG
    port = int(sys.argv[1])
    if "--erase-log" in sys.argv:
        ERASE_LOG = sys.argv[sys.argv.index("--erase-log") + 1]
    if "--exit-at-once" in sys.argv:
        print("stand-in: failing at start-up", flush=True)
        raise SystemExit(3)
    if "--ignore-sigterm" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
