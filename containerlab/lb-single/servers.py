#!/usr/bin/env python3
"""Backend servers for the lb-single lab (stdlib only).

  HTTP  :8080  GET / -> {"backend": NAME, "peer": "ip:port"}   (the client address it saw)
  TCP   :9000  echo; each line comes back as "NAME <line>"
  UDP   :9001  each datagram -> {"backend": NAME, "peer": "ip:port", "data": ...}
Each listens on IPv4 and, where the node has IPv6, on IPv6 too (peer "[ip6]:port").
`--tcp P,P` / `--udp P,P` add IPv4 echo / UDP listeners on more ports (a Kubernetes node's
NodePorts in the k8s-pair-l2 lab).
"""
import http.server
import json
import socket
import socketserver
import sys
import threading

NAME = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else socket.gethostname()


def extra_ports(flag):
    """The ports listed after `flag` (comma-separated), if it is given."""
    if flag in sys.argv[:-1]:
        return [int(p) for p in sys.argv[sys.argv.index(flag) + 1].split(",") if p]
    return []


def peer_str(peer):
    host, port = peer[0], peer[1]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


class Http(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        body = json.dumps({"backend": NAME, "peer": peer_str(self.client_address)}).encode()
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

    def handle_error(self, request, client_address):
        pass


class HttpServer(http.server.ThreadingHTTPServer):
    # Python's default backlog of 5 drops SYNs as soon as a few health probes (which close
    # with a reset) and clients arrive together; resets are a probe's normal close, not an
    # error worth a traceback.
    request_queue_size = 512
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


class V6Only:
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


class Http6(V6Only, HttpServer):
    pass


class Threaded6(V6Only, Threaded):
    pass


def udp_socket(family, addr, port=9001):
    s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    return s


def udp(s):
    while True:
        data, peer = s.recvfrom(65535)
        reply = {"backend": NAME, "peer": peer_str(peer), "data": data.decode(errors="replace")}
        s.sendto(json.dumps(reply).encode(), peer)


def main():
    http_srv = HttpServer(("0.0.0.0", 8080), Http)
    http_srv.daemon_threads = True
    echo = Threaded(("0.0.0.0", 9000), Echo)
    loops = [http_srv.serve_forever, echo.serve_forever, lambda: udp(udp_socket(socket.AF_INET, "0.0.0.0"))]
    for port in extra_ports("--tcp"):
        loops.append(Threaded(("0.0.0.0", port), Echo).serve_forever)
    for port in extra_ports("--udp"):
        sock = udp_socket(socket.AF_INET, "0.0.0.0", port)
        loops.append(lambda sock=sock: udp(sock))
    try:
        http6 = Http6(("::", 8080), Http)
        http6.daemon_threads = True
        echo6 = Threaded6(("::", 9000), Echo)
        u6 = udp_socket(socket.AF_INET6, "::")
        loops += [http6.serve_forever, echo6.serve_forever, lambda: udp(u6)]
    except OSError as e:
        print("no IPv6 servers:", e, flush=True)
    for f in loops:
        threading.Thread(target=f, daemon=True).start()
    print("servers up as", NAME, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
