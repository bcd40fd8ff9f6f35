"""Download a real dataset (LLaVA-665k, Vision-Flan) into the layout LLaVA's training code expects.

A manifest (shipped in ``xmas/resources/datasets/``, or a file of the user's) lists the annotation
file and the image archives with
their URL and, where known, size and sha256. Each file is fetched into ``<dest>/downloads/`` as a
``.part`` file that a later run resumes with an HTTP Range request, verified (size; sha256 where
the manifest states one, else computed and recorded), then published: the annotation file is
linked into ``<dest>/``, archives are unpacked into the image folder. ``downloads/state.json``
remembers what is complete, so a second run does nothing; ``<dest>/download.json`` is written
last and says what is there.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from xmas import __version__
from xmas.errors import XmasError
from xmas.io import atomic_path, write_json
from xmas.progress import StageStats, log, progress
from xmas.resources import resource

DATASETS = resource("datasets")
BLOCK = 1 << 20
HEADERS = {"User-Agent": f"xmas/{__version__} (+dataset download)"}


class Interrupted(Exception):
    """A transfer that stopped early; the next attempt resumes from the bytes on disk."""


@dataclass
class Entry:
    """One file of a manifest: a plain file (``save_as``), an archive (``unpack``) or a URL list."""

    name: str
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    save_as: str | None = None
    unpack: dict | None = None
    url_list: dict | None = None
    optional: bool = False

    @property
    def file_name(self) -> str:
        """Its name in downloads/: the entry name first, as sources reuse names (GQA's and VG's images.zip)."""
        return f"{self.name}-{PurePosixPath(urllib.parse.urlparse(self.url or '').path).name or 'file'}"


@dataclass
class Manifest:
    name: str
    annotations: str
    image_root: str
    entries: list[Entry] = field(default_factory=list)
    path: Path | None = None


def resolve_manifest(dataset: str) -> Path:
    """A dataset name (a file in resources/datasets/) or the path of a manifest of your own."""
    path = Path(dataset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise XmasError(f"dataset manifest {path} not found")
        return path
    path = DATASETS / f"{dataset}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DATASETS.glob("*.yaml")))
        raise XmasError(f"unknown dataset {dataset!r}: known are {known}, or give the path of a manifest (.yaml)")
    return path


def load_manifest(path: Path) -> Manifest:
    data = yaml.safe_load(Path(path).read_text()) or {}
    missing = [key for key in ("name", "annotations", "image_root", "files") if key not in data]
    if missing:
        raise XmasError(f"{path}: manifest lacks {', '.join(missing)}")
    allowed = set(Entry.__dataclass_fields__)
    entries = []
    for position, item in enumerate(data["files"]):
        unknown = set(item) - allowed
        if unknown or "name" not in item:
            raise XmasError(
                f"{path}: files[{position}] needs a name and may only have {sorted(allowed)}; "
                f"unknown: {sorted(unknown)}"
            )
        entry = Entry(**item)
        kinds = [entry.save_as is not None, entry.unpack is not None, entry.url_list is not None]
        if sum(kinds) != 1 or (entry.url_list is None and not entry.url):
            raise XmasError(f"{path}: file {entry.name!r} needs a url and exactly one of save_as, unpack, url_list")
        if entry.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(entry.sha256)):
            raise XmasError(f"{path}: file {entry.name!r}: sha256 must be 64 lowercase hex digits or null")
        entries.append(entry)
    return Manifest(data["name"], data["annotations"], data["image_root"], entries, Path(path))


# ----------------------------------------------------------------------------- HTTP


def fetch(
    url: str, part: Path, expected: int | None, *, label: str, retries: int, retry_wait: float, timeout: float
) -> int:
    """Download ``url`` into ``part``, resuming from the bytes already there; returns the file's size.

    Interrupted transfers are retried (with Range, so no byte is fetched twice) ``retries`` times;
    after that the ``.part`` file is kept for the next run.
    """
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if expected is not None and have == expected:
            return have
        if expected is not None and have > expected:
            log.warning("%s: %s holds more bytes than the file has; starting over", label, part)
            part.unlink()
            have = 0
        try:
            return transfer(url, part, have, expected, label=label, timeout=timeout)
        except Interrupted as error:
            failures += 1
            done = part.stat().st_size if part.exists() else 0
            if failures > retries:
                raise XmasError(
                    f"{label}: transfer of {url} interrupted ({error}); {done} bytes are kept in {part}, "
                    "run again to resume"
                ) from None
            wait = retry_wait * 2 ** (failures - 1)
            log.warning(
                "%s: transfer interrupted (%s) at %d bytes; resuming in %.0fs (attempt %d of %d)",
                label,
                error,
                done,
                wait,
                failures,
                retries,
            )
            time.sleep(wait)


def transfer(url: str, part: Path, have: int, expected: int | None, *, label: str, timeout: float) -> int:
    """One HTTP request: append the rest of the file to ``part``. Raises Interrupted or XmasError."""
    headers = {**HEADERS, **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        return refused(error, url, part, have, expected, label)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise Interrupted(str(getattr(error, "reason", error))) from None
    with response:
        if have and response.status == 206:
            start, total = content_range(response.headers.get("Content-Range"))
            if start != have:
                raise Interrupted(f"the server resumed at byte {start}, not {have}")
        else:
            if have:
                log.warning("%s: the server ignored the range request; fetching the whole file again", label)
            have = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if expected is not None and total is not None and total != expected:
            raise XmasError(
                f"{label}: {url} is {total} bytes, the manifest says {expected}: the file at the "
                "source changed; check it and update the manifest"
            )
        total = total if total is not None else expected
        if total is not None:
            ensure_space(part.parent, total - have, label)
        size = copy_body(response, part, have, total, label)
    if total is not None and size != total:
        raise Interrupted(f"the connection closed after {size} of {total} bytes")
    return size


def refused(error: urllib.error.HTTPError, url: str, part: Path, have: int, expected: int | None, label: str) -> int:
    """An HTTP error status: 416 on a complete part, retryable server trouble, or a clear failure."""
    if error.code == 416 and have:
        _, total = content_range(error.headers.get("Content-Range"))
        if total == have or (total is None and expected == have):
            return have
        part.unlink()
        raise Interrupted("the server could not resume from the partial file; starting over")
    if error.code in (404, 410):
        raise XmasError(
            f"{label}: {url} answered HTTP {error.code} {error.reason}: the file is not (or no longer) "
            "there; check the URL in the dataset manifest"
        ) from None
    if error.code in (408, 429) or error.code >= 500:
        raise Interrupted(f"HTTP {error.code} {error.reason}") from None
    raise XmasError(f"{label}: {url} answered HTTP {error.code} {error.reason}") from None


def content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` -> (100, 1000); ``bytes */1000`` -> (None, 1000); total None when ``*``."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def copy_body(response, part: Path, have: int, total: int | None, label: str) -> int:
    """Append the response body to ``part`` in 1 MiB blocks; returns the size of ``part`` after."""
    size = have
    blocks = iter(lambda: read_block(response), b"")
    count = math.ceil((total - have) / BLOCK) if total is not None else None
    try:
        with open(part, "ab" if have else "wb") as out:
            for block in progress(blocks, total=count, desc=f"download {label}", unit="MiB"):
                out.write(block)
                size += len(block)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            free = shutil.disk_usage(part.parent).free
            raise XmasError(
                f"{label}: disk full while writing {part} ({free} bytes free); free some space and run "
                f"again to resume (the bytes fetched so far are kept)"
            ) from None
        raise Interrupted(str(error)) from None
    return part.stat().st_size


def read_block(response) -> bytes:
    try:
        return response.read(BLOCK)
    except (OSError, http.client.HTTPException) as error:
        raise Interrupted(f"{type(error).__name__}: {error}") from None


def ensure_space(folder: Path, needed: int, label: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise XmasError(f"{label}: not enough disk space in {folder}: {needed} more bytes needed, {free} free")


def sha256_of(path: Path, label: str) -> str:
    digest = hashlib.sha256()
    count = math.ceil(path.stat().st_size / BLOCK)
    with open(path, "rb") as handle:
        for block in progress(iter(lambda: handle.read(BLOCK), b""), total=count, desc=f"sha256 {label}", unit="MiB"):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the dataset folder


class Downloader:
    def __init__(
        self,
        manifest: Manifest,
        dest: Path,
        *,
        keep_archives: bool = False,
        retries: int = 5,
        retry_wait: float = 5.0,
        timeout: float = 60.0,
        workers: int = 8,
    ):
        self.manifest = manifest
        self.dest = Path(dest)
        self.downloads = self.dest / "downloads"
        self.state_path = self.downloads / "state.json"
        self.keep_archives = keep_archives
        self.http = {"retries": retries, "retry_wait": retry_wait, "timeout": timeout}
        self.workers = workers
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def save_state(self) -> None:
        write_json(self.state, self.state_path)

    def run(self, stats: StageStats) -> dict:
        self.downloads.mkdir(parents=True, exist_ok=True)
        report = {}
        for entry in self.manifest.entries:
            if entry.url_list is not None:
                report[entry.name] = self.fetch_url_list(entry)
            else:
                report[entry.name] = self.fetch_entry(entry)
            stats.add(report[entry.name]["status"].replace(" ", "_"))
        return report

    # plain files and archives

    def recorded(self, entry: Entry) -> dict:
        """What the state says was fetched for this entry, if it still fits the manifest (else {})."""
        done = self.state.get(entry.name, {})
        fits = (
            done.get("url") == entry.url
            and entry.sha256 in (None, done.get("sha256"))
            and entry.size in (None, done.get("bytes"))
        )
        return done if fits else {}

    def published(self, entry: Entry) -> bool:
        done = self.recorded(entry)
        if not done.get("published"):
            return False
        if entry.save_as is not None:
            target = self.dest / entry.save_as
            return target.is_file() and target.stat().st_size == done["bytes"]
        return (self.dest / entry.unpack["to"]).is_dir()

    def fetch_entry(self, entry: Entry) -> dict:
        if self.published(entry):
            log.info("%s: already complete", entry.name)
            return {**self.state[entry.name], "status": "already complete"}
        stored = self.downloads / entry.file_name
        done = self.recorded(entry)
        verified = bool(done) and stored.is_file() and stored.stat().st_size == done["bytes"]
        if not verified:
            done = self.download(entry, stored)
        self.publish(entry, stored)
        self.state[entry.name] = {**done, "published": True}
        self.save_state()
        return {**self.state[entry.name], "status": "published again" if verified else "downloaded"}

    def download(self, entry: Entry, stored: Path) -> dict:
        part = stored.with_name(stored.name + ".part")
        size = fetch(entry.url, part, entry.size, label=entry.name, **self.http)
        digest = sha256_of(part, entry.name)
        if entry.sha256 is not None and digest != entry.sha256:
            part.unlink()
            raise XmasError(
                f"{entry.name}: checksum mismatch for {entry.url}: sha256 {digest}, the manifest says "
                f"{entry.sha256}; the download was deleted, run again to fetch it anew (if it fails "
                "again, the file at the source changed)"
            )
        os.replace(part, stored)
        done = {
            "url": entry.url,
            "file": stored.name,
            "bytes": size,
            "sha256": digest,
            "sha256_source": "manifest" if entry.sha256 else "computed (unknown at the source)",
        }
        self.state[entry.name] = done
        self.save_state()
        return done

    def publish(self, entry: Entry, stored: Path) -> None:
        if entry.save_as is not None:
            link_or_copy(stored, self.dest / entry.save_as)
            return
        unpack(stored, entry.unpack, self.dest, entry.name)
        if not self.keep_archives:
            stored.unlink()

    # URL lists (OCR-VQA: one image per URL)

    def fetch_url_list(self, entry: Entry) -> dict:
        spec = entry.url_list
        listing = self.dest / spec["list"]
        if not listing.is_file():
            message = (
                f"{entry.name}: the URL list {listing} is not there. {spec.get('how', '')}".strip()
                + " Records whose images are missing are excluded by prepare (image_missing)."
            )
            if not entry.optional:
                raise XmasError(message)
            log.warning("%s", message)
            return {"status": "missing", "list": str(listing)}
        wanted = self.referenced_images(spec["prefix"])
        try:
            urls = {key: item["imageURL"] for key, item in json.loads(listing.read_text()).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise XmasError(f'{listing}: expected a JSON object of id -> {{"imageURL": ...}} ({error})') from None
        target = self.dest / self.manifest.image_root / spec["prefix"]
        target.mkdir(parents=True, exist_ok=True)
        todo = [(name, urls.get(PurePosixPath(name).stem)) for name in sorted(wanted) if not (target / name).is_file()]
        failed = {name: "not in the URL list" for name, url in todo if url is None}
        todo = [(name, url) for name, url in todo if url is not None]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = pool.map(lambda item: fetch_small(item[1], target / item[0], self.http["timeout"]), todo)
            for (name, _), error in progress(
                zip(todo, results), total=len(todo), desc=f"download {entry.name}", unit="img"
            ):
                if error is not None:
                    failed[name] = error
        failures = self.downloads / f"{entry.name}.failed.tsv"
        with atomic_path(failures) as tmp:
            tmp.write_text("".join(f"{name}\t{why}\n" for name, why in sorted(failed.items())))
        if failed:
            log.warning(
                "%s: %d of %d images could not be fetched (listed in %s); prepare excludes their records "
                "as image_missing",
                entry.name,
                len(failed),
                len(wanted),
                failures,
            )
        return {
            "status": "downloaded",
            "images": len(wanted) - len(failed),
            "failed": len(failed),
            "failed_list": str(failures),
        }

    def referenced_images(self, prefix: str) -> set[str]:
        """File names under ``prefix`` that the annotation file refers to (only those are fetched)."""
        from xmas.data.annotations import iter_spans

        names = set()
        for span in iter_spans(self.dest / self.manifest.annotations):
            image = span.record.get("image") if isinstance(span.record, dict) else None
            for path in image if isinstance(image, list) else [image]:
                if isinstance(path, str) and path.startswith(prefix):
                    names.add(path[len(prefix) :])
        return names


def fetch_small(url: str, path: Path, timeout: float) -> str | None:
    """Fetch one small file in one request; the error as text, or None."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=HEADERS), timeout=timeout) as response:
            data = response.read()
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code} {error.reason}"
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        return f"{type(error).__name__}: {getattr(error, 'reason', error)}"
    with atomic_path(path, seal=False) as tmp:
        tmp.write_bytes(data)
    return None


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (no second copy on disk) or, across file systems, copy ``source`` to ``target``, atomically."""
    with atomic_path(target, seal=False) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)


def unpack(archive: Path, spec: dict, dest: Path, label: str) -> None:
    """Unpack ``archive`` and move its folder ``spec['member']`` (or all of it) to ``dest / spec['to']``."""
    target = dest / spec["to"]
    for stale in target.parent.glob(f".{target.name}.*"):  # staging left by a killed unpack
        shutil.rmtree(stale, ignore_errors=True)
    fmt = spec.get("format", "zip")
    with atomic_path(target, seal=False) as tmp:
        staging = tmp.parent / "unpacked"
        try:
            if fmt == "zip":
                unzip(archive, staging, label)
            elif fmt == "tar":
                untar(archive, staging, label)
            else:
                raise XmasError(f"{label}: unknown archive format {fmt!r} (zip, tar)")
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as error:
            archive.unlink()
            raise XmasError(
                f"{label}: {archive} is not a readable {fmt} archive ({error}); it was deleted, run "
                "again to fetch it anew"
            ) from None
        member = spec.get("member")
        source = staging / member if member else staging
        if not source.is_dir():
            found = sorted(p.name for p in staging.iterdir())[:10]
            raise XmasError(
                f"{label}: {archive} has no folder {member!r} at its top (found: {found}); "
                "update `member` in the manifest"
            )
        source.rename(tmp)
    log.info("%s: unpacked into %s", label, target)


def unzip(archive: Path, staging: Path, label: str) -> None:
    with zipfile.ZipFile(archive) as bundle:
        members = bundle.infolist()
        for info in members:
            if stat.S_ISLNK(info.external_attr >> 16):  # a symlink entry (its target is the entry's content)
                raise refused_link(label, archive, info.filename, bundle.read(info).decode(errors="replace"))
        ensure_space(staging.parent, sum(info.file_size for info in members), label)
        for info in progress(members, total=len(members), desc=f"unpack {label}", unit="file"):
            bundle.extract(info, staging)  # extract() drops absolute paths and '..' from member names


def untar(archive: Path, staging: Path, label: str) -> None:
    with tarfile.open(archive) as bundle:
        for member in progress(bundle, desc=f"unpack {label}", unit="file"):
            if member.issym() or member.islnk():
                raise refused_link(label, archive, member.name, member.linkname)
            try:
                bundle.extract(member, staging, filter="data")  # "data": no absolute paths, devices
            except tarfile.FilterError as error:
                raise XmasError(f"{label}: {archive} is refused: {error}; the archive is kept") from None


def refused_link(label: str, archive: Path, name: str, target: str) -> XmasError:
    """Image archives hold files: a link in one (it could point anywhere once unpacked) refuses the archive,
    which is kept for a look (fetching it again would bring the same)."""
    return XmasError(
        f"{label}: {archive} holds a link, {name} -> {target}; an archive of images has no business holding "
        "links, so it is not unpacked (the archive is kept: check where it came from)"
    )
