"""A stand-in for the Hub's HTTP API on 127.0.0.1, for huggingface_hub's real client (no network, no mock of the
library): whoami, repo creation, and the requests of a folder upload (preupload, commit).

Tests set `whoami`, `create_status` and `upload_status` to answer as the Hub does for an invalid or read-only
token, a refused repo or a failing upload, and read what arrived in `requests` and `uploaded`.
The `local_hub` fixture (tests/conftest.py) points the client at the server (HF_ENDPOINT, for child processes too) with a token.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WRITE_USER = {"name": "me", "orgs": [{"name": "my-org"}], "auth": {"accessToken": {"role": "write"}}}


class LocalHub:
    def __init__(self):
        self.whoami: dict | int = WRITE_USER  # a dict answers 200; a number is the error status
        self.create_status = 200
        self.upload_status = 200  # of the preupload request that starts every upload
        self.delay_s = 0.0  # before answering whoami
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.created: list[dict] = []  # create_repo payloads
        self.uploaded: dict[str, list[str]] = {}  # repo id -> paths of the committed files
        self.validated: list[str] = []  # READMEs whose metadata the client had checked
        self.contents: dict[str, bytes] = {}  # path in the repo -> the bytes committed
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def refusal(self, authorization: str | None) -> int | None:
        """The Hub's answer to a write without a token (401), with the token whoami refuses, or a read-only one (403)."""
        if not authorization:
            return 401
        if isinstance(self.whoami, int):
            return self.whoami
        return 403 if self.whoami.get("auth", {}).get("accessToken", {}).get("role") == "read" else None

    def handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("X-Error-Message", body["error"])
                if status >= 500:
                    self.send_header("Retry-After", "0")  # the client's 5 retries then wait 1 s each, not 1 to 8
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                if self.path == "/api/whoami-v2":
                    threading.Event().wait(hub.delay_s)
                    if isinstance(hub.whoami, int):
                        return self.answer(hub.whoami, {"error": "Invalid credentials in Authorization header"})
                    return self.answer(200, hub.whoami)
                self.answer(404, {"error": "Repository not found"})

            def do_POST(self):
                hub.requests.append(("POST", self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/api/repos/create":
                    refusal = hub.refusal(self.headers.get("Authorization"))
                    if refusal:
                        return self.answer(refusal, {"error": "You don't have the rights to create a model"})
                    if hub.create_status != 200:
                        return self.answer(hub.create_status, {"error": "You don't have the rights to create a model"})
                    payload = json.loads(body)
                    hub.created.append(payload)
                    return self.answer(200, {"url": f"{hub.url}/{payload['organization']}/{payload['name']}"})
                if self.path == "/api/validate-yaml":  # the client has a README's metadata checked before a commit
                    hub.validated.append(json.loads(body)["content"])
                    return self.answer(200, {"errors": [], "warnings": []})
                parts = self.path.removeprefix("/api/models/").split("/")  # ns, name, action, revision
                repo, action = "/".join(parts[:2]), parts[2] if len(parts) > 2 else ""
                if action.startswith("preupload"):
                    if hub.upload_status != 200:
                        return self.answer(hub.upload_status, {"error": "Internal Error"})
                    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                             for f in json.loads(body)["files"]]
                    return self.answer(200, {"files": files})
                if action.startswith("commit"):
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    paths = [line["value"]["path"] for line in lines if line["key"] == "file"]
                    hub.uploaded[repo] = paths
                    hub.contents.update({p: base64.b64decode(line["value"]["content"])
                                         for p, line in zip(paths, [x for x in lines if x["key"] == "file"])})
                    return self.answer(200, {"commitUrl": f"{hub.url}/{repo}/commit/abc", "commitOid": "a" * 40})
                self.answer(404, {"error": "unknown endpoint"})

        return Handler


def serve(monkeypatch, tmp_path):
    """A LocalHub the Hub client talks to (in this process and in child processes), with a token, online;
    the `local_hub` fixture of tests/conftest.py."""
    import huggingface_hub.constants as constants

    hub = LocalHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_file"))
    yield hub
    hub.server.shutdown()
    hub.server.server_close()
