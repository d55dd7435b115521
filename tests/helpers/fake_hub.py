"""A local stand-in for the HuggingFace Hub's HTTP API, serving one dataset repository.

With it, the real ``huggingface_hub.snapshot_download`` (what ``hf download`` runs) and the real
``datasets.load_dataset("org/name")`` fill a temporary cache exactly as a download from the Hub
would, without the network: the tests of cached hub ids then read a cache no test wrote by hand.
It answers the few routes those two use: ``/api/datasets/{id}/revision/{rev}``,
``/api/datasets/{id}/tree/{rev}[/{path}]`` and ``/datasets/{id}/resolve/{rev}/{file}``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
"""The commit sha every revision of the fake repository resolves to."""


class FakeHub:
    """Serves ``files`` (path in the repo -> bytes) as dataset repository ``repo_id``."""

    def __init__(self, repo_id: str, files: Mapping[str, bytes]) -> None:
        self.repo_id = repo_id
        self.files = dict(files)
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def tree(self, sub: str, recursive: bool) -> list[dict[str, Any]]:
        """The entries under ``sub``: files, and (not recursive) its direct sub-directories."""
        prefix = f"{sub}/" if sub else ""
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for path, content in sorted(self.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                d = prefix + rest.split("/")[0]
                if d not in dirs:
                    dirs.add(d)
                    out.append({"type": "directory", "path": d, "oid": "0" * 40})
                continue
            out.append({"type": "file", "path": path, "size": len(content), "oid": _oid(content)})
        return out

    def answer(self, url: str) -> tuple[int, bytes, dict[str, str]]:
        """Status, body and headers for a GET (a HEAD sends the same headers)."""
        path = unquote(urlparse(url).path)
        api = f"/api/datasets/{self.repo_id}"
        as_json = {"Content-Type": "application/json"}
        if path.startswith(f"{api}/revision/"):
            info = {
                "id": self.repo_id,
                "sha": COMMIT,
                "siblings": [{"rfilename": f} for f in sorted(self.files)],
            }
            return 200, json.dumps(info).encode(), as_json
        if path.startswith(f"{api}/tree/"):
            _, _, sub = path[len(f"{api}/tree/") :].partition("/")
            listing = self.tree(sub.strip("/"), "recursive=true" in url)
            return 200, json.dumps(listing).encode(), as_json
        resolve = f"/datasets/{self.repo_id}/resolve/"
        if path.startswith(resolve):
            _, _, name = path[len(resolve) :].partition("/")
            if name in self.files:
                content = self.files[name]
                return 200, content, {"X-Repo-Commit": COMMIT, "ETag": f'"{_oid(content)}"'}
            return 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}
        return 404, b"", {"X-Error-Code": "RepoNotFound"}


def _oid(content: bytes) -> str:
    return hashlib.sha1(content).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, send_body: bool) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            status, body, headers = hub.answer(self.path)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._reply(True)

        def do_HEAD(self) -> None:
            self._reply(False)

    return Handler


@contextmanager
def fake_hub_online(
    monkeypatch: pytest.MonkeyPatch, repo_id: str, files: Mapping[str, bytes]
) -> Iterator[FakeHub]:
    """Serve the repository and point ``huggingface_hub`` and ``datasets`` at it, online, for
    the ``with`` block only (afterwards every later call in the test is offline-only again)."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    hub = FakeHub(repo_id, files)
    with monkeypatch.context() as m:
        m.setattr(hub_constants, "ENDPOINT", hub.endpoint)
        m.setattr(
            hub_constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )
        m.setattr(datasets.config, "HF_ENDPOINT", hub.endpoint)
        m.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        m.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        try:
            yield hub
        finally:
            hub.close()


def use_tmp_hf_cache(monkeypatch: pytest.MonkeyPatch, home: Any) -> None:
    """Point every HuggingFace cache at ``home`` (environment and the already-imported
    libraries' constants, which read the environment at import time), offline."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    hub_cache, datasets_cache = str(home / "hub"), str(home / "datasets")
    for name, value in {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": hub_cache,
        "HF_DATASETS_CACHE": datasets_cache,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
