"""A minimal local stand-in for the Hugging Face Hub's upload API, for tests (127.0.0.1 only, in-memory).

It answers what `HfApi.create_repo` and `HfApi.upload_folder` call (huggingface_hub 2.x): repo creation, YAML
validation, pre-upload (every file "regular", i.e. inline), the NDJSON commit, and 404 on `resolve` lookups. Files of
each commit land in `server.repos[repo_id][path] = bytes`.

```python
with LocalHub() as hub:        # hub.endpoint == "http://127.0.0.1:<port>"
    ...  # run code with HF_ENDPOINT=hub.endpoint
    hub.repos["user/model"]["README.md"]
```
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args):  # keep test output quiet
        pass

    def _reply(self, status: int, payload=None) -> None:
        body = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path))
        self._reply(404)

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        self._reply(404, {"error": "not found"})

    def do_POST(self):
        self.server.requests.append(("POST", self.path))
        body = self._body()
        endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            request = json.loads(body or b"{}")
            repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
            self.server.repos.setdefault(repo_id, {})
            return self._reply(200, {"url": f"{endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
        if self.path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
        if match and match.group(2) == "preupload":
            files = json.loads(body)["files"]
            return self._reply(
                200,
                {
                    "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files],
                    "commitOid": "0" * 40,
                },
            )
        if match and self.server.failing_commits:  # a Hub that accepts the repo but fails the upload
            return self._reply(403, {"error": "upload refused by the test stand-in"})
        if match:
            repo = self.server.repos.setdefault(match.group(1), {})
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    repo[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply(
                200,
                {
                    "commitUrl": f"{endpoint}/{match.group(1)}/commit/{'1' * 40}",
                    "commitOid": "1" * 40,
                    "success": True,
                },
            )
        self._reply(404, {"error": f"unknown endpoint {self.path}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        self.failing_commits = False


class LocalHub:
    """Start the stand-in on a free port of 127.0.0.1 on enter; stop it on exit.

    With `failing_commits=True` it creates repos but answers every commit with 403 (an upload that fails).
    """

    def __init__(self, failing_commits: bool = False):
        self.failing_commits = failing_commits

    def __enter__(self) -> LocalHub:
        self.server = _Server()
        self.server.failing_commits = self.failing_commits
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.repos = self.server.repos
        self.requests = self.server.requests
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
