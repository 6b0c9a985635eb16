"""A logging HTTP proxy: forwards every request to a server unchanged (replies streamed back as they come)
and appends each POST body sent to one of the recorded paths to a JSON-lines file.

How tests/serve/data/open_webui_chat.json was recorded (once, by hand; see docs/serving.md "Open WebUI"):
    python tests/serve/webui/record_proxy.py --listen 11436 --to http://127.0.0.1:11435 --out /tmp/requests.jsonl
with `gptcore serve` on 11435 and Open WebUI's OLLAMA_BASE_URL on the proxy, a chat typed into its page.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

RECORDED = ("/api/chat", "/v1/chat/completions", "/api/generate")


def make_handler(target: str, out: str):
    parts = urlsplit(target)
    lock = threading.Lock()

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.command == "POST" and self.path.split("?")[0] in RECORDED and body:
                with lock, open(out, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"path": self.path, "body": json.loads(body)}) + "\n")
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            reply = conn.getresponse()
            self.send_response(reply.status)
            for key, value in reply.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                self.wfile.write(b"0\r\n\r\n")
                conn.close()
                return
            while chunk := reply.read1(65536):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            conn.close()

        do_GET = do_POST = do_DELETE = do_HEAD = _forward

        def log_message(self, *args) -> None:
            pass

    return Proxy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--to", required=True, help="the server's URL, e.g. http://127.0.0.1:11435")
    parser.add_argument("--out", required=True, help="JSON-lines file the recorded bodies are appended to")
    args = parser.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.listen), make_handler(args.to, args.out)).serve_forever()


if __name__ == "__main__":
    main()
