"""xmas download against a real HTTP server on loopback: full download, resume, checksum, 404, disk full."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from xmas.cli import main
from xmas.data.download import BLOCK, Downloader, load_manifest, resolve_manifest, unpack
from xmas.errors import XmasError
from xmas.progress import StageStats

from loopback import FileServer

ANNOTATIONS = json.dumps([{"id": "a", "image": "coco/imgs/1.png", "conversations": []}]).encode()
PAYLOAD = bytes(range(256)) * (3 * BLOCK // 256 + 7)  # a bit over 3 MiB: several blocks


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in files.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(path: Path, files: list[dict]) -> Path:
    path.write_text(
        yaml.safe_dump({"name": "fixture", "annotations": "train.json", "image_root": "images", "files": files})
    )
    return path


def download(manifest: Path, dest: Path, **options) -> dict:
    settings = {"retries": 0, "retry_wait": 0.0, "timeout": 10.0, **options}
    return Downloader(load_manifest(manifest), dest, **settings).run(StageStats("test"))


def test_shipped_manifests_load_and_lay_out_the_llava_folders():
    llava = load_manifest(resolve_manifest("llava665k"))
    assert llava.annotations == "llava_v1_5_mix665k.json" and llava.image_root == "images"
    folders = {entry.unpack["to"] for entry in llava.entries if entry.unpack}
    assert folders == {
        "images/coco/train2017",
        "images/gqa/images",
        "images/textvqa/train_images",
        "images/vg/VG_100K",
        "images/vg/VG_100K_2",
    }
    assert any(entry.url_list and entry.url_list["prefix"] == "ocr_vqa/images/" for entry in llava.entries)
    flan = load_manifest(resolve_manifest("visionflan"))
    assert (flan.annotations, flan.image_root) == ("annotation_191-task_1k.json", "images_191task_1k")
    with pytest.raises(XmasError, match="unknown dataset 'nope'.*llava665k"):
        resolve_manifest("nope")


def test_full_download_publishes_the_file_and_unpacks_the_archive(tmp_path):
    archive = zipped({"imgs/1.png": b"one", "imgs/sub/2.png": b"two"})
    with FileServer({"/train.json": ANNOTATIONS, "/coco.zip": archive}) as server:
        manifest = write_manifest(
            tmp_path / "m.yaml",
            [
                {
                    "name": "annotations",
                    "url": server.url("/train.json"),
                    "save_as": "train.json",
                    "size": len(ANNOTATIONS),
                    "sha256": sha256(ANNOTATIONS),
                },
                {
                    "name": "coco",
                    "url": server.url("/coco.zip"),
                    "unpack": {"member": "imgs", "to": "images/coco/imgs"},
                },
            ],
        )
        dest = tmp_path / "data"
        code = main(["download", "--dataset", str(manifest), "--dest", str(dest), "--retry-wait", "0"])
        assert code == 0
        assert (dest / "train.json").read_bytes() == ANNOTATIONS
        assert (dest / "images/coco/imgs/1.png").read_bytes() == b"one"
        assert (dest / "images/coco/imgs/sub/2.png").read_bytes() == b"two"
        assert not (dest / "downloads/coco-coco.zip").exists()  # archives go once unpacked
        report = json.loads((dest / "download.json").read_text())
        assert report["annotations"] == str(dest / "train.json") and report["image_root"] == str(dest / "images")
        assert report["files"]["annotations"]["sha256_source"] == "manifest"
        assert report["files"]["coco"]["sha256"] == sha256(archive)  # unknown at the source: computed, recorded
        assert report["files"]["coco"]["sha256_source"].startswith("computed")
        assert len(server.requests) == 2

        again = download(manifest, dest)
        assert {item["status"] for item in again.values()} == {"already complete"}
        assert len(server.requests) == 2  # nothing fetched a second time

        (dest / "train.json").unlink()  # e.g. Snakemake removed the rule's output before rerunning it
        assert download(manifest, dest)["annotations"]["status"] == "published again"
        assert (dest / "train.json").read_bytes() == ANNOTATIONS and len(server.requests) == 2


def test_an_interrupted_transfer_resumes_where_it_stopped(tmp_path):
    with FileServer({"/big.bin": PAYLOAD}) as server:
        cut = BLOCK + 123
        server.cut_after["/big.bin"] = cut
        manifest = write_manifest(
            tmp_path / "m.yaml",
            [{"name": "big", "url": server.url("/big.bin"), "save_as": "big.bin", "sha256": sha256(PAYLOAD)}],
        )
        download(manifest, tmp_path / "data", retries=2)
        assert (tmp_path / "data/big.bin").read_bytes() == PAYLOAD
        requests = server.served("/big.bin")
        assert [(r.range, r.sent) for r in requests] == [(None, cut), (f"bytes={cut}-", len(PAYLOAD) - cut)]
        assert sum(r.sent for r in requests) == len(PAYLOAD)  # the first part was not fetched twice


def test_a_download_interrupted_for_good_is_resumed_by_the_next_run(tmp_path):
    with FileServer({"/big.bin": PAYLOAD}) as server:
        cut = 2 * BLOCK + 5
        server.cut_after["/big.bin"] = cut
        manifest = write_manifest(
            tmp_path / "m.yaml",
            [{"name": "big", "url": server.url("/big.bin"), "save_as": "big.bin", "size": len(PAYLOAD)}],
        )
        with pytest.raises(XmasError, match=r"big: transfer of .* interrupted .* run again to resume"):
            download(manifest, tmp_path / "data", retries=0)
        part = tmp_path / "data/downloads/big-big.bin.part"
        assert part.stat().st_size == cut and not (tmp_path / "data/big.bin").exists()
        download(manifest, tmp_path / "data")
        assert (tmp_path / "data/big.bin").read_bytes() == PAYLOAD and not part.exists()
        assert server.served("/big.bin")[-1].range == f"bytes={cut}-"
        assert sum(r.sent for r in server.served("/big.bin")) == len(PAYLOAD)


def test_a_complete_part_file_is_not_fetched_again(tmp_path):
    with FileServer({"/big.bin": PAYLOAD}) as server:
        manifest = write_manifest(
            tmp_path / "m.yaml", [{"name": "big", "url": server.url("/big.bin"), "save_as": "big.bin"}]
        )
        (tmp_path / "data/downloads").mkdir(parents=True)
        (tmp_path / "data/downloads/big-big.bin.part").write_bytes(PAYLOAD)  # killed right after the last byte
        download(manifest, tmp_path / "data")
        assert (tmp_path / "data/big.bin").read_bytes() == PAYLOAD
        assert [(r.status, r.sent) for r in server.served("/big.bin")] == [(416, 0)]


def test_a_server_that_ignores_range_gets_a_clean_restart(tmp_path):
    with FileServer({"/big.bin": PAYLOAD}) as server:
        server.cut_after["/big.bin"] = BLOCK
        server.ignore_range.add("/big.bin")
        manifest = write_manifest(
            tmp_path / "m.yaml",
            [{"name": "big", "url": server.url("/big.bin"), "save_as": "big.bin", "sha256": sha256(PAYLOAD)}],
        )
        download(manifest, tmp_path / "data", retries=1)
        assert (tmp_path / "data/big.bin").read_bytes() == PAYLOAD


def test_a_checksum_mismatch_fails_and_discards_the_download(tmp_path):
    with FileServer({"/train.json": ANNOTATIONS}) as server:
        wrong = "0" * 64
        manifest = write_manifest(
            tmp_path / "m.yaml",
            [{"name": "annotations", "url": server.url("/train.json"), "save_as": "train.json", "sha256": wrong}],
        )
        with pytest.raises(XmasError) as caught:
            download(manifest, tmp_path / "data")
        message = str(caught.value)
        assert "annotations: checksum mismatch" in message and wrong in message and sha256(ANNOTATIONS) in message
        assert not (tmp_path / "data/train.json").exists()
        assert not list((tmp_path / "data/downloads").glob("*.part"))


def test_a_size_other_than_the_manifest_says_fails(tmp_path):
    with FileServer({"/train.json": ANNOTATIONS}) as server:
        manifest = write_manifest(
            tmp_path / "m.yaml",
            [
                {
                    "name": "annotations",
                    "url": server.url("/train.json"),
                    "save_as": "train.json",
                    "size": len(ANNOTATIONS) + 1,
                }
            ],
        )
        with pytest.raises(XmasError, match=f"is {len(ANNOTATIONS)} bytes, the manifest says {len(ANNOTATIONS) + 1}"):
            download(manifest, tmp_path / "data")


def test_a_missing_file_is_a_clear_404(tmp_path, capfd):
    with FileServer() as server:
        manifest = write_manifest(
            tmp_path / "m.yaml", [{"name": "annotations", "url": server.url("/gone.json"), "save_as": "train.json"}]
        )
        code = main(["download", "--dataset", str(manifest), "--dest", str(tmp_path / "data")])
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"annotations: {server.url('/gone.json')} answered HTTP 404 Not Found" in err


def test_a_full_disk_is_a_clear_error(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    with FileServer({"/big.bin": PAYLOAD}) as server:
        manifest = write_manifest(
            tmp_path / "m.yaml", [{"name": "big", "url": server.url("/big.bin"), "save_as": "big.bin"}]
        )
        (tmp_path / "data/downloads").mkdir(parents=True)
        os.symlink("/dev/full", tmp_path / "data/downloads/big-big.bin.part")  # every write: ENOSPC
        with pytest.raises(XmasError, match=r"big: disk full while writing .*big-big\.bin\.part"):
            download(manifest, tmp_path / "data")


def test_a_url_list_fetches_the_referenced_images_and_lists_the_dead_links(tmp_path):
    records = [{"id": str(i), "image": f"ocr_vqa/images/{i}.jpg", "conversations": []} for i in (1, 2, 3)]
    with FileServer({"/train.json": json.dumps(records).encode(), "/img/1": b"jpeg-1", "/img/9": b"unused"}) as server:
        listing = {
            "1": {"imageURL": server.url("/img/1")},
            "2": {"imageURL": server.url("/img/2")},
            "9": {"imageURL": server.url("/img/9")},
        }
        manifest = write_manifest(
            tmp_path / "m.yaml",
            [
                {"name": "annotations", "url": server.url("/train.json"), "save_as": "train.json"},
                {"name": "ocr", "optional": True, "url_list": {"list": "ocr.json", "prefix": "ocr_vqa/images/"}},
            ],
        )
        dest = tmp_path / "data"
        missing = download(manifest, dest)
        assert missing["ocr"]["status"] == "missing"  # optional and no list yet: a warning, not an error
        (dest / "ocr.json").write_text(json.dumps(listing))
        report = download(manifest, dest)
        assert (dest / "images/ocr_vqa/images/1.jpg").read_bytes() == b"jpeg-1"
        assert report["ocr"]["images"] == 1 and report["ocr"]["failed"] == 2
        failed = (dest / "downloads/ocr.failed.tsv").read_text()
        assert "2.jpg\tHTTP 404" in failed and "3.jpg\tnot in the URL list" in failed
        assert not server.served("/img/9")  # not referenced by the annotations: not fetched


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_an_archive_holding_a_link_is_refused_and_kept(fmt, tmp_path):
    """A link in an image archive could lead anywhere once unpacked: the archive is not unpacked, and kept."""
    archive = tmp_path / f"images.{fmt}"
    if fmt == "tar":
        with tarfile.open(archive, "w") as bundle:
            image = tarfile.TarInfo("imgs/a.jpg")
            image.size = 3
            bundle.addfile(image, io.BytesIO(b"jpg"))
            link = tarfile.TarInfo("imgs/b.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"  # inside the archive: tar's "data" filter allows it
            bundle.addfile(link)
    else:
        with zipfile.ZipFile(archive, "w") as bundle:
            bundle.writestr("imgs/a.jpg", b"jpg")
            link = zipfile.ZipInfo("imgs/b.jpg")
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(link, "/etc/passwd")
    with pytest.raises(XmasError, match=r"holds a link, imgs/b\.jpg -> .*it is not unpacked \(the archive is kept"):
        unpack(archive, {"format": fmt, "member": "imgs", "to": "images/coco"}, tmp_path / "dest", "coco")
    assert archive.is_file() and not (tmp_path / "dest" / "images" / "coco").exists()
