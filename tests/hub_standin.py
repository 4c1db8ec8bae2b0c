"""A stand-in for the Hugging Face Hub's HTTP API, on 127.0.0.1, for `llmtune push` tests.

It answers the calls the real `huggingface_hub` client makes to create a repository and a
branch and to commit files (preupload, then an NDJSON commit), and keeps what arrives. Every
file is declared a "regular" upload, which the client then sends inline, base64-encoded, in the
commit: the LFS and Xet transfer protocols are not stood in for, and the test says so.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Hub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo]["branches"][branch]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self):
                hub.requests.append(("POST", self.path, dict(self.headers)))
                body = self._body()
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    request = json.loads(body)
                    repo = f"{request.get('organization') or 'user'}/{request['name']}"
                    if repo in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": repo})
                    private = request.get("visibility", "private" if request.get("private") else "public") == "private"
                    hub.repos[repo] = {"private": private, "branches": {"main": {}}}
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo}"})
                if parts[:2] == ["api", "validate-yaml"]:  # the client checks a README's front matter
                    return self._reply(200, {"errors": [], "warnings": []})
                if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models":
                    repo, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                    branches = hub.repos[repo]["branches"]
                    if action == "branch":
                        branches.setdefault(revision, dict(branches["main"]))
                        return self._reply(200, {})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                    if action == "commit":
                        branch = branches[revision.replace("%2F", "/")]
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                branch[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                            elif item["key"] != "header":
                                return self._reply(400, {"error": f"not stood in for: {item['key']}"})
                        return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/1",
                                                 "commitOid": "1" * 40})
                return self._reply(404, {"error": f"not stood in for: POST {self.path}"})

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers)))
                return self._reply(404, {"error": f"not stood in for: GET {self.path}"})

        return Handler
