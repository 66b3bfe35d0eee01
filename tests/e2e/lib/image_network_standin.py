"""Stand-in for the few Glance v2 and Neutron v2.0 read calls Nova makes when it boots or evacuates a
server with the fake virt driver and `"networks": "none"`. Not an emulator: one image, no ports.

usage: image_network_standin.py IMAGE_PORT NETWORK_PORT   (both on 127.0.0.1)
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

IMAGE_ID = "a0e0e000-0000-4000-8000-00000000a0e0"
IMAGE = {
    "id": IMAGE_ID, "name": "ax-e2e-image", "status": "active", "visibility": "public",
    "disk_format": "raw", "container_format": "bare", "size": 1024, "virtual_size": 1024,
    "min_disk": 0, "min_ram": 0, "protected": False, "os_hidden": False, "tags": [],
    "checksum": "d41d8cd98f00b204e9800998ecf8427e", "os_hash_algo": "sha512", "os_hash_value": None,
    "owner": None, "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
    "file": "/v2/images/%s/file" % IMAGE_ID, "self": "/v2/images/%s" % IMAGE_ID,
    "schema": "/v2/schemas/image", "locations": [], "direct_url": None,
}
SCHEMA = {"name": "image", "additionalProperties": {"type": "string"}, "links": [],
          "properties": {k: {} for k in IMAGE}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kind = "?"

    def log_message(self, fmt, *args):
        sys.stdout.write("%s %s\n" % (self.kind, fmt % args))
        sys.stdout.flush()

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def drain(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        me = "http://%s" % self.headers.get("Host")
        if self.kind == "image":
            routes = {
                "": {"versions": [{"id": "v2.16", "status": "CURRENT", "links": [{"rel": "self", "href": me + "/v2/"}]}]},
                "/versions": {"versions": [{"id": "v2.16", "status": "CURRENT", "links": [{"rel": "self", "href": me + "/v2/"}]}]},
                "/v2/schemas/image": SCHEMA,
                "/v2/images": {"images": [IMAGE], "schema": "/v2/schemas/images", "first": "/v2/images"},
                "/v2/images/" + IMAGE_ID: IMAGE,
            }
            if path in routes:
                return self.reply(200, routes[path])
            return self.reply(404, {"message": "no such image resource"})
        if path == "":
            return self.reply(200, {"versions": [{"id": "v2.0", "status": "CURRENT", "links": [{"rel": "self", "href": me + "/v2.0/"}]}]})
        if path.startswith("/v2.0/"):
            parts = path[len("/v2.0/"):].split("/")
            if len(parts) == 1:  # any collection: empty
                return self.reply(200, {parts[0].replace(".json", "").replace("-", "_"): []})
        return self.reply(404, {"NeutronError": {"type": "NotFound", "message": "not found", "detail": ""}})

    def do_POST(self):
        self.drain()
        self.reply(404, {"message": "the stand-in creates nothing"})

    do_PUT = do_POST

    def do_DELETE(self):
        self.drain()
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()


def serve(kind, port):
    cls = type("Handler_" + kind, (Handler,), {"kind": kind})
    ThreadingHTTPServer(("127.0.0.1", port), cls).serve_forever()


if __name__ == "__main__":
    threading.Thread(target=serve, args=("network", int(sys.argv[2])), daemon=True).start()
    serve("image", int(sys.argv[1]))
