"""Published weights by name (``usfmae pull``): the whole path against a local HTTP server on 127.0.0.1.

The server plays the roles the internet would: a plain file host with ``Range`` support, a host that drops the
connection halfway, and Google Drive's direct-download endpoint with its virus-scan confirmation page. The file it
serves is a real facebook-MAE state dict (what the USF-MAE authors publish: ``torch.save(model.state_dict())``) of
a tiny MAE. No test reaches the internet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DRIVE_ID = "1AbC-test_id"


class _Server:
    """Files by path; records the requests' Range headers; ``/drop/<name>`` sends half of the file and closes."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.requests = files, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                from urllib.parse import parse_qs, urlparse

                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                owner.requests.append((url.path, self.headers.get("Range"), query))
                if url.path == "/download":  # Drive: the confirmation page for a large file
                    if query.get("id") != DRIVE_ID:
                        return self._send(404, b"no such file", "text/plain")
                    page = ('<html><body><form id="download-form" action="/download-confirmed" method="get">'
                            f'<input type="hidden" name="id" value="{DRIVE_ID}">'
                            '<input type="hidden" name="export" value="download">'
                            '<input type="hidden" name="confirm" value="t">'
                            '<input type="hidden" name="uuid" value="a-b-c">'
                            '<input type="submit" value="Download anyway"></form></body></html>')
                    return self._send(200, page.encode(), "text/html; charset=utf-8")
                if url.path == "/download-confirmed":
                    if query.get("uuid") != "a-b-c":
                        return self._send(403, b"bad uuid", "text/plain")
                    return self._file(owner.files["model.pth"])
                name = url.path.strip("/")
                if name.startswith("drop/"):
                    data = owner.files[name[5:]]
                    if self.headers.get("Range") is None:  # first request: half, then the connection dies
                        self.send_response(200)
                        self.send_header("Content-Type", "application/octet-stream")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return None
                    return self._file(data)
                if name not in owner.files:
                    return self._send(404, b"not found", "text/plain")
                return self._file(owner.files[name])

            def _file(self, data: bytes) -> None:
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    return self._send(416, b"", "text/plain")
                self.send_response(206 if rng else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                self.wfile.write(data[start:])
                return None

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _facebook_mae_bytes(tmp: Path, seed: int = 0) -> bytes:
    """A tiny MAE saved as the USF-MAE authors save theirs: a plain facebook ``models_mae`` state dict."""
    from usfmae_core.checkpoints import to_facebook_state_dict
    from usfmae_core.networks.presets import build_model, mae_config

    torch.manual_seed(seed)
    model = build_model("mae", mae_config("vit_test", img_size=32))
    path = tmp / f"fb_{seed}.pth"
    torch.save(to_facebook_state_dict(model.state_dict()), path)
    return path.read_bytes()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    srv = _Server({"model.pth": _facebook_mae_bytes(tmp_path), "other.pth": _facebook_mae_bytes(tmp_path, 1)})
    yield srv
    srv.close()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("USFMAE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _cli(*args: str, home: Path, lines: bool = False) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "USFMAE_HOME": str(home)}
    env.pop("USFMAE_PROGRESS_LINES", None)
    if lines:
        env["USFMAE_PROGRESS_LINES"] = "1"
    return subprocess.run([sys.executable, "-m", "usfmae_core.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


def test_pull_records_sha256_imports_and_works_by_name(server: _Server, home: Path) -> None:
    """``usfmae pull`` downloads into the cache with progress lines, records the sha256, imports the MAE; the name
    then works as ``--init`` (finetune's and pretrain's model building) and a second pull uses the cache."""
    from usfmae_core.checkpoints import load_checkpoint
    from usfmae_core.hub import sha256_of
    from usfmae_core.workflows.finetune import build_classifier
    from usfmae_core.workflows.pretrain import build_pretrain_model

    proc = _cli("pull", "usf-mae-100ep", "--url", f"{server.url}/model.pth", home=home, lines=True)
    assert proc.returncode == 0, proc.stderr
    raw = home / "models" / "downloads" / "USF-MAE_100ep.pth"
    assert raw.read_bytes() == server.files["model.pth"]
    registry = json.loads((home / "models" / "downloads" / "sha256.json").read_text())
    assert registry["usf-mae-100ep"]["sha256"] == sha256_of(raw) and f"recorded sha256 {sha256_of(raw)}" in proc.stdout
    progress = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
                if line.startswith("USFMAE_PROGRESS ")]
    assert progress and progress[-1]["step"] == progress[-1]["total"] == len(server.files["model.pth"])
    assert progress[-1]["stage"] == "pull usf-mae-100ep"
    ckpt = load_checkpoint("usf-mae-100ep")  # by name, from the cache
    assert ckpt["arch"] == "mae" and ckpt["meta"]["source_format"] == "facebook_mae"
    assert ckpt["config"]["hidden_size"] == 48
    model, config = build_classifier(3, init="usf-mae-100ep")
    assert config["hidden_size"] == 48 and model.head.out_features == 3
    mae, _ = build_pretrain_model(init="usf-mae-100ep")
    torch.testing.assert_close(mae.state_dict()["encoder.cls_token"], ckpt["model"]["encoder.cls_token"])
    n = len(server.requests)
    again = _cli("pull", "usf-mae-100ep", "--url", f"{server.url}/model.pth", home=home)
    assert again.returncode == 0 and "in the model cache" in again.stdout and len(server.requests) == n


def test_pull_refuses_a_changed_file(server: _Server, home: Path) -> None:
    """After the first download, a re-download whose sha256 differs from the recorded one is refused in one line and
    the cached model is left as it was."""
    ok = _cli("pull", "usf-mae-100ep", "--url", f"{server.url}/model.pth", home=home)
    assert ok.returncode == 0, ok.stderr
    cached = (home / "models" / "usf-mae-100ep.pt").read_bytes()
    bad = _cli("pull", "usf-mae-100ep", "--force", "--no-progress", "--url", f"{server.url}/other.pth", home=home)
    err = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(err) == 1 and "sha256" in err[0] and "differs" in err[0], bad.stderr
    assert (home / "models" / "usf-mae-100ep.pt").read_bytes() == cached
    assert (home / "models" / "downloads" / "USF-MAE_100ep.pth.rejected").exists()


def test_download_resumes_after_a_dropped_connection_and_from_a_part_file(server: _Server, tmp_path: Path) -> None:
    """A connection that dies halfway is resumed with a Range request; a ``.part`` file left by an interrupted run
    is continued, not restarted."""
    from usfmae_core.hub import download

    data = server.files["model.pth"]
    out = download(f"{server.url}/drop/model.pth", tmp_path / "a.pth", progress=False)
    assert out.read_bytes() == data and not (tmp_path / "a.pth.part").exists()
    ranges = [r for p, r, _ in server.requests if p == "/drop/model.pth"]
    assert ranges[0] is None and ranges[1] is not None and int(ranges[1].split("=")[1].rstrip("-")) > 0

    (tmp_path / "b.pth.part").write_bytes(data[:1000])
    out = download(f"{server.url}/model.pth", tmp_path / "b.pth", progress=False)
    assert out.read_bytes() == data
    assert [r for p, r, _ in server.requests if p == "/model.pth"][-1] == "bytes=1000-"


def test_google_drive_link_follows_the_confirmation_form(server: _Server, tmp_path: Path) -> None:
    """A Drive sharing link goes to Drive's direct-download endpoint; its virus-scan page's form is followed."""
    from usfmae_core.hub import download, drive_file_id

    link = f"https://drive.google.com/file/d/{DRIVE_ID}/view?usp=drive_link"
    assert drive_file_id(link) == DRIVE_ID and drive_file_id("https://example.org/file/d/x") is None
    out = download(link, tmp_path / "d.pth", progress=False, drive_endpoint=f"{server.url}/download")
    assert out.read_bytes() == server.files["model.pth"]
    paths = [p for p, _, _ in server.requests]
    assert paths == ["/download", "/download-confirmed"]
    assert server.requests[0][2] == {"id": DRIVE_ID, "export": "download", "confirm": "t"}


def test_offline_pull_is_one_line_with_the_manual_route(home: Path) -> None:
    """No server: one line naming the address to fetch by hand and the import-weights command to run next."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/USF-MAE.pth"
    proc = _cli("pull", "usf-mae-500ep", "--url", url, home=home)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("usfmae: error: usf-mae-500ep: cannot download")
    assert url in err[0] and "usfmae import-weights USF-MAE_500ep.pth --out" in err[0]
    assert "usf-mae-500ep.pt" in err[0]


def test_pull_without_internet_fails_fast_in_one_line(home: Path) -> None:
    """The published name with its real Google Drive link on a machine without internet (name resolution fails, as
    here; stubbed so that no query leaves the machine): one line that says so, names the link to fetch by hand and
    the import-weights command, within a second of starting (torch and MONAI are not even imported)."""
    import os

    code = (
        "import socket, sys\n"
        "def offline(*a, **k):\n"
        "    raise socket.gaierror(-2, 'Name or service not known')\n"
        "socket.getaddrinfo = offline\n"
        "from usfmae_core import cli\n"
        "rc = cli.main(['pull', 'usf-mae-100ep', '--no-progress'])\n"
        "print('RC', rc, 'TORCH', 'torch' in sys.modules, 'MONAI', 'monai' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "USFMAE_HOME": str(home)})
    assert "RC 2 TORCH False MONAI False" in proc.stdout, (proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    link = "https://drive.google.com/file/d/1ZPu_7KhMEuaq-XdLhVp2EEgMgLJ4dKhr/view?usp=drive_link"
    assert err[0].startswith(f"usfmae: error: usf-mae-100ep: cannot download {link} (no network connection or "
                             "unknown host drive.usercontent.google.com"), err[0]
    assert f"usfmae import-weights USF-MAE_100ep.pth --out {home / 'models' / 'usf-mae-100ep.pt'}" in err[0]
    assert not (home / "models" / "usf-mae-100ep.pt").exists()
