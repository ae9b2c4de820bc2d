"""Published USF-MAE weights by name: ``usfmae pull usf-mae-100ep`` and ``--init usf-mae-100ep``.

The USF-MAE authors link two pretrained MAE checkpoints (ViT-B/16, facebook ``models_mae`` state dicts, 224 px) from
their repository README (https://github.com/Yusufii9/USF-MAE, "Checkpoints"), as public Google Drive files.
:func:`pull` downloads one into the model cache (``$USFMAE_HOME/models`` or ``~/.usfmae/models``), verifies it and
converts it with :func:`usfmae_core.checkpoints.import_weights` to ``<cache>/<name>.pt``, which every command then
takes by name (:func:`resolve_init`).

- Download: HTTP ``Range`` requests into ``<cache>/downloads/<file>.part``, so an interrupted download continues where
  it stopped (MONAI's ``monai.apps.download_url`` fetches into a temporary folder that is deleted on failure, so a
  500 MB checkpoint would restart from zero, and its tqdm bar cannot feed the Slicer module's progress protocol).
  Google Drive sharing links (``drive.google.com/file/d/<id>/view``) are turned into Drive's direct-download address;
  when Drive answers with its "cannot scan for viruses" page, the download form on it is followed.
- Progress: :class:`usfmae_core.workflows.common.Progress` (a tqdm bar in bytes, or ``USFMAE_PROGRESS`` lines with
  ``USFMAE_PROGRESS_LINES=1``, which the Slicer module's "fetch weights" job reads).
- Integrity: a sha256 pinned in :data:`MODELS` is checked when there is one; otherwise the sha256 of the first
  download is recorded in ``<cache>/downloads/sha256.json`` and every later download or re-import is checked
  against it (MONAI's ``check_hash``).
- Offline or failed: one line with the address to fetch by hand and the ``usfmae import-weights`` command to run.
"""

from __future__ import annotations

import hashlib
import html.parser
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usfmae_core.errors import UsfmaeError

__all__ = ["MODELS", "PublishedModel", "download", "drive_file_id", "model_cache_dir", "pull", "resolve_init"]

DRIVE_DOWNLOAD = "https://drive.usercontent.google.com/download"
CHUNK = 1 << 20  # bytes per read (and per progress update)


@dataclass(frozen=True)
class PublishedModel:
    """A checkpoint published by others that ``usfmae pull`` fetches by ``name``."""

    name: str
    description: str
    url: str  # the link the authors publish (a Google Drive sharing link)
    filename: str  # name of the downloaded file in <cache>/downloads
    source: str  # where the link is published
    licence: str
    sha256: str | None = None  # pinned by a maintainer once known (RELEASING.md); else recorded at first download


MODELS: dict[str, PublishedModel] = {
    "usf-mae-100ep": PublishedModel(
        name="usf-mae-100ep",
        description="USF-MAE ViT-B/16 MAE, 100 epochs on OpenUS-46 (370k ultrasound images); the authors' "
                    "recommended checkpoint",
        url="https://drive.google.com/file/d/1ZPu_7KhMEuaq-XdLhVp2EEgMgLJ4dKhr/view?usp=drive_link",
        filename="USF-MAE_100ep.pth",
        source="https://github.com/Yusufii9/USF-MAE#-checkpoints",
        licence="MIT (the USF-MAE repository's licence); cite Megahed et al., BSPC 2026 / arXiv:2510.22990",
    ),
    "usf-mae-500ep": PublishedModel(
        name="usf-mae-500ep",
        description="USF-MAE ViT-B/16 MAE, 500 epochs on OpenUS-46 (370k ultrasound images)",
        url="https://drive.google.com/file/d/15n71qHXSBjEjrLtCOzvBb6gTsGhh7NUg/view?usp=drive_link",
        filename="USF-MAE_500ep.pth",
        source="https://github.com/Yusufii9/USF-MAE#-checkpoints",
        licence="MIT (the USF-MAE repository's licence); cite Megahed et al., BSPC 2026 / arXiv:2510.22990",
    ),
}


def model_cache_dir() -> Path:
    """The model cache: ``$USFMAE_HOME/models`` or ``~/.usfmae/models`` (what ``usfmae info`` shows)."""
    from usfmae_core.commands.info import model_cache_dir as cache

    return cache()


def _lookup(name: str) -> PublishedModel:
    if name not in MODELS:
        raise UsfmaeError(f"unknown published model '{name}'", f"choose one of {', '.join(MODELS)}")
    return MODELS[name]


# ---------------------------------------------------------------------------------------------------- download
def drive_file_id(url: str) -> str | None:
    """The file id of a Google Drive link (``/file/d/<id>/...``, ``open?id=<id>``, ``uc?id=<id>``), else None."""
    parts = urllib.parse.urlparse(url)
    if not parts.netloc.endswith(("drive.google.com", "drive.usercontent.google.com", "docs.google.com")):
        return None
    m = re.search(r"/file/d/([\w-]+)", parts.path)
    if m:
        return m.group(1)
    ids = urllib.parse.parse_qs(parts.query).get("id")
    return ids[0] if ids else None


class _DriveForm(html.parser.HTMLParser):
    """The download form of Drive's "cannot scan this file for viruses" page: its action and hidden inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and (a.get("id") == "download-form" or "download" in a.get("action", "")):
            self._in_form, self.action = True, a.get("action")
        elif tag == "input" and self._in_form and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _direct_url(url: str, drive_endpoint: str = DRIVE_DOWNLOAD) -> str:
    file_id = drive_file_id(url)
    if file_id is None:
        return url
    return f"{drive_endpoint}?{urllib.parse.urlencode({'id': file_id, 'export': 'download', 'confirm': 't'})}"


def _open(url: str, start: int, timeout: float) -> Any:
    request = urllib.request.Request(url, headers={"User-Agent": "usfmae", **({"Range": f"bytes={start}-"}
                                                                             if start else {})})
    return urllib.request.urlopen(request, timeout=timeout)


def download(url: str, dest: str | os.PathLike, progress: bool = True, timeout: float = 60.0, retries: int = 3,
             drive_endpoint: str = DRIVE_DOWNLOAD, stage: str = "download") -> Path:
    """Download ``url`` to ``dest``, continuing a partial ``dest.part`` left by an interrupted download.

    Google Drive sharing links are fetched from Drive's direct-download address (``drive_endpoint``), following the
    download form of its virus-scan warning page. A dropped connection is resumed up to ``retries`` times.

    Raises:
        UsfmaeError: the server refuses or the network fails (the ``.part`` file is kept for the next try), or Drive
            answers with a web page that holds no download (quota exceeded, not shared).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    target = _direct_url(url, drive_endpoint)
    bar = None
    attempts = 0
    try:
        while True:
            start = part.stat().st_size if part.exists() else 0
            try:
                response = _open(target, start, timeout)
            except urllib.error.HTTPError as err:
                if err.code == 416 and start:  # nothing left after `start`: the .part file is complete
                    break
                raise
            with response:
                ctype = response.headers.get("Content-Type", "")
                if ctype.startswith("text/html") and drive_file_id(url) is not None:
                    form = _DriveForm()
                    form.feed(response.read(1 << 20).decode("utf-8", "replace"))
                    if not form.action or "id" not in form.fields:
                        raise UsfmaeError(f"Google Drive answered {url} with a web page instead of the file "
                                          "(download quota exceeded, or the file is no longer shared)",
                                          "try again later, or download it in a browser")
                    target = f"{urllib.parse.urljoin(target, form.action)}?{urllib.parse.urlencode(form.fields)}"
                    continue
                resumed = start > 0 and response.status == 206
                if not resumed:
                    start = 0  # the server sends the whole file: start over
                length = response.headers.get("Content-Length")
                total = start + int(length) if length is not None else 0
                if bar is None:
                    # imported only once the server answers: an offline attempt fails without loading torch
                    from usfmae_core.workflows.common import Progress

                    bar = Progress(total, stage, disable=not progress, initial=start)
                    bar.bar.unit, bar.bar.unit_scale, bar.bar.unit_divisor = "B", True, 1024
                    if resumed:
                        bar.write(f"continuing {dest.name} from {start / 2**20:.1f} MiB")
                with open(part, "ab" if resumed else "wb") as f:
                    try:
                        while chunk := response.read(CHUNK):
                            f.write(chunk)
                            bar.update(len(chunk))
                    except (OSError, http.client.HTTPException) as err:  # dropped connection, short read
                        attempts += 1
                        if attempts > retries:
                            raise
                        bar.write(f"connection lost ({err}); resuming ({attempts}/{retries})")
                        time.sleep(min(2.0 * attempts, 10.0))
                        continue
                if total and part.stat().st_size < total:
                    attempts += 1
                    if attempts > retries:
                        raise UsfmaeError(f"the download of {url} stopped at {part.stat().st_size} of {total} bytes",
                                          "run the same command again: it continues where it stopped")
                    continue
                break
    except UsfmaeError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as err:  # URLError / HTTPError are OSErrors
        reason = getattr(err, "reason", None) or err
        if isinstance(reason, socket.gaierror):  # DNS failed: most often no internet access at all
            reason = f"no network connection or unknown host {urllib.parse.urlparse(target).hostname}: {reason}"
        raise UsfmaeError(f"cannot download {url} ({str(reason).splitlines()[0][:160]})",
                          f"check the connection and run again (it continues from {part.name})") from None
    finally:
        if bar is not None:
            bar.close()
    os.replace(part, dest)
    return dest


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------- cache
def _registry_path(cache: Path) -> Path:
    return cache / "downloads" / "sha256.json"


def _registry(cache: Path) -> dict[str, Any]:
    path = _registry_path(cache)
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise UsfmaeError(f"cannot read {path} ({err})", "delete it (the next download records the hashes again)"
                          ) from None


def _record(cache: Path, name: str, entry: dict[str, Any]) -> None:
    path = _registry_path(cache)
    reg = _registry(cache)
    reg[name] = entry
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(reg, indent=2) + "\n")
    os.replace(tmp, path)


def _manual_fix(model: PublishedModel, url: str, cache: Path) -> str:
    return (f"download that file by hand (a browser, on a machine with internet access) as {model.filename}, then "
            f"run: usfmae import-weights {model.filename} --out {cache / (model.name + '.pt')} "
            f"(then the name {model.name} works wherever a model is asked for)")


def pull(name: str, url: str | None = None, progress: bool = True, force: bool = False,
         drive_endpoint: str = DRIVE_DOWNLOAD, log: Any = print) -> Path:
    """Fetch the published model ``name`` into the model cache and import it; returns ``<cache>/<name>.pt``.

    Args:
        name: a key of :data:`MODELS` (``usf-mae-100ep``, ``usf-mae-500ep``).
        url: download from this address instead (a mirror, or a local copy as ``file://``).
        progress: show the progress bar (``USFMAE_PROGRESS`` lines when ``USFMAE_PROGRESS_LINES=1``).
        force: download and import again even when the cache has the model.
        drive_endpoint: Google Drive's direct-download address (tests point it at a local server).
        log: where to say what happens (one line each).

    Raises:
        UsfmaeError: unknown name; download failed (one line with the address and the ``import-weights`` command to
            run after fetching it by hand); sha256 different from the pinned or first-recorded one.
    """
    model = _lookup(name)
    cache = model_cache_dir()
    out = cache / f"{model.name}.pt"
    raw = cache / "downloads" / model.filename
    url = url or model.url
    if out.exists() and not force:
        log(f"{model.name} is in the model cache: {out}")
        return out
    expected = model.sha256 or _registry(cache).get(model.name, {}).get("sha256")
    if force and raw.exists():
        raw.unlink()
    if not raw.exists():
        log(f"downloading {model.name} ({model.description}) from {url}")
        try:
            download(url, raw, progress=progress, drive_endpoint=drive_endpoint, stage=f"pull {model.name}")
        except UsfmaeError as err:
            raise UsfmaeError(f"{model.name}: {err.cause}", _manual_fix(model, url, cache)) from None
    from monai.apps.utils import check_hash  # torch and MONAI only after the download (offline fails fast)

    from usfmae_core.checkpoints import import_weights

    digest = sha256_of(raw)
    if expected and not check_hash(raw, expected, "sha256"):
        bad = raw.with_name(raw.name + ".rejected")
        os.replace(raw, bad)
        raise UsfmaeError(f"{model.name}: the downloaded file's sha256 {digest[:16]}... differs from the expected "
                          f"{expected[:16]}... (kept as {bad})",
                          "download it again (usfmae pull --force); if it keeps differing the published file has "
                          f"changed: check {model.source}")
    if not expected:
        _record(cache, model.name, {"sha256": digest, "url": url, "bytes": raw.stat().st_size,
                                    "file": model.filename, "recorded": time.strftime("%Y-%m-%d %H:%M:%S")})
        log(f"recorded sha256 {digest} of {raw.name} (first download; later downloads are checked against it)")
    else:
        log(f"sha256 verified: {digest}")
    try:
        import_weights(raw, out)
    except UsfmaeError as err:
        raise UsfmaeError(f"{model.name}: the downloaded file cannot be imported ({err.cause})",
                          f"delete {raw} and run usfmae pull {model.name} again") from None
    log(f"imported {model.name} -> {out} (use it as --init {model.name})")
    return out


def resolve_init(name_or_path: str | os.PathLike, progress: bool = True) -> Path:
    """A checkpoint path for ``--init``-like arguments: an existing path as is, a published model's name as its file
    in the model cache (downloaded and imported by :func:`pull` on first use)."""
    path = Path(name_or_path).expanduser()
    if path.exists() or str(name_or_path) not in MODELS:
        return path
    cached = model_cache_dir() / f"{name_or_path}.pt"
    if cached.exists():
        return cached
    return pull(str(name_or_path), progress=progress)
