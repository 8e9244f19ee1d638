#!/usr/bin/env python3
"""Backend servers for the lb-single lab (stdlib only).

  HTTP  :8080  GET / -> {"backend": NAME, "peer": "ip:port"}   (the client address it saw)
  TCP   :9000  echo; each line comes back as "NAME <line>"
  UDP   :9001  each datagram -> {"backend": NAME, "peer": "ip:port", "data": ...}
"""
import http.server
import json
import socket
import socketserver
import sys
import threading

NAME = sys.argv[1] if len(sys.argv) > 1 else socket.gethostname()


class Http(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        body = json.dumps({"backend": NAME, "peer": "%s:%d" % self.client_address}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(NAME.encode() + b" " + line)
            self.wfile.flush()


class Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 9001))
    while True:
        data, peer = s.recvfrom(65535)
        reply = {"backend": NAME, "peer": "%s:%d" % peer, "data": data.decode(errors="replace")}
        s.sendto(json.dumps(reply).encode(), peer)


def main():
    http_srv = http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Http)
    http_srv.daemon_threads = True
    echo = Threaded(("0.0.0.0", 9000), Echo)
    for f in (http_srv.serve_forever, echo.serve_forever, udp):
        threading.Thread(target=f, daemon=True).start()
    print("servers up as", NAME, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
