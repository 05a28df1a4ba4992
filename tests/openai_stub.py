"""A tiny OpenAI-compatible chat server for tests: http.server on 127.0.0.1 in a thread, with
scripted replies. Point a script at it with `--base_url stub.url`.

    with OpenAIStub(["0.7", 500, "0.4"]) as stub:     # replies in order, then `default`
        ...
    stub.requests   # the JSON body of every request received, in order
    stub.headers    # their headers, keys lower-case (e.g. stub.headers[0]["authorization"])

A reply is a str (a normal completion with that content), an int (that HTTP status, with an
OpenAI-style error body), a dict (sent as the JSON body as is, e.g. {"choices": []}), bytes
(sent raw with status 200: a malformed body), a (status, dict) tuple (that status with that JSON
body), RESET (the connection is dropped without a reply), Delay(seconds, reply) (that reply, late:
a client with a shorter timeout gives up), or a callable taking the request body and returning one
of those. `default` (same kinds) answers once the script is used up; None = status 500."""
import collections
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RESET = object()
Delay = collections.namedtuple("Delay", "seconds reply")


def completion(content, model="stub"):
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


class OpenAIStub:
    def __init__(self, replies=(), default=None):
        self.script, self.default = list(replies), default
        self.requests, self.headers = [], []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with stub.lock:
                    stub.requests.append(body)
                    stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                    reply = stub.script.pop(0) if stub.script else stub.default
                if callable(reply):
                    reply = reply(body)
                if isinstance(reply, Delay):
                    time.sleep(reply.seconds)
                    reply = reply.reply
                if reply is RESET:  # SO_LINGER 0: close() sends a TCP reset instead of a reply
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                status, payload = 200, reply
                if isinstance(reply, tuple):
                    status, payload = reply
                elif reply is None or isinstance(reply, int):
                    status = reply or 500
                    payload = {"error": {"message": f"stub status {status}", "type": "stub", "code": status}}
                elif isinstance(reply, str):
                    payload = completion(reply, body.get("model", "stub"))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):  # keep test output clean
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that timed out has gone: no noise
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
