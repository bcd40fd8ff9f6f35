"""Atomic, sealed file writes and the checked readers every stage shares.

Every file or folder a stage writes through :func:`atomic_path` gets a seal beside it
(``.<name>.seal``): the size and SHA-256 of each file, and the command that made it. Readers verify
the seal before trusting what they read, so a truncated or damaged output is named, with the
command that redoes it, instead of surfacing as a bare parser error far from its cause.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xmas.errors import XmasError

SEAL_PREFIX, SEAL_SUFFIX = ".", ".seal"
# Below this much free space, a failed write is reported as a full disk.
NEARLY_FULL_BYTES = 64 * 2**20
_command: list[str] = []
_verified: set[tuple] = set()  # outputs verify() found whole, as unchanged_since() saw them


def set_command(argv: list[str]) -> None:
    """The command line of this process, recorded in each seal as the way to redo the file."""
    _command[:] = argv


def seal_path(target: str | Path) -> Path:
    target = Path(target)
    return target.with_name(f"{SEAL_PREFIX}{target.name}{SEAL_SUFFIX}")


def sealed_target(seal: Path) -> Path:
    return seal.with_name(seal.name[len(SEAL_PREFIX) : -len(SEAL_SUFFIX)])


def file_digest(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def content_of(path: Path) -> dict[str, list]:
    """``{relative name: [size, sha256]}`` of a file (named ``.``) or of every file under a folder."""
    if path.is_file():
        return {".": [path.stat().st_size, file_digest(path)]}
    files = sorted(item for item in path.rglob("*") if item.is_file())
    return {str(item.relative_to(path)): [item.stat().st_size, file_digest(item)] for item in files}


@dataclass(frozen=True)
class Damage:
    """What differs between a sealed output and what is on disk now."""

    path: Path
    what: str
    command: list[str]

    def message(self) -> str:
        redo = f"snakemake --force {shlex.quote(str(self.path))}"
        made_by = f" (made by `{shlex.join(self.command[:2])}`)" if self.command else ""
        alone = f"; or on its own: {shlex.join(self.command)}" if self.command else ""
        return (
            f"{self.path}{made_by} is damaged: {self.what}. It is not used; redo it with: {redo} "
            f"(with the --configfile and --profile you ran){alone}"
        )


class DamagedOutput(XmasError):
    def __init__(self, damage: Damage):
        super().__init__(damage.message())
        self.damage = damage


def read_seal(target: Path) -> dict | None:
    """The seal of ``target``; None when there is none (made by hand, or by an older xmas) or it cannot be
    read (a seal cut short): then there is nothing to check."""
    try:
        seal = json.loads(seal_path(target).read_text())
    except (OSError, ValueError):
        return None
    return seal if isinstance(seal, dict) and isinstance(seal.get("files"), dict) else None


def damage_of(target: str | Path, checksums: bool = True) -> Damage | None:
    """How ``target`` differs from its seal (sizes only unless ``checksums``); None if it matches or has none."""
    target = Path(target)
    seal = read_seal(target)
    if seal is None or not target.exists():
        return None
    command = seal.get("command", [])
    for name, (size, digest) in seal["files"].items():
        path = target if name == "." else target / name
        if not path.is_file():
            return Damage(target, f"{path} is missing", command)
        if path.stat().st_size != size:
            return Damage(target, f"{path} holds {path.stat().st_size} bytes, {size} were written", command)
        if checksums and file_digest(path) != digest:
            return Damage(target, f"{path} does not hold what was written (its SHA-256 differs)", command)
    return None


def verify(target: str | Path) -> Path:
    """``target`` if it holds what was written (or has no seal); else :class:`DamagedOutput`.

    An output is hashed once per process (a checkpoint is verified by the stage, then again by the
    loader) while neither it nor its seal changes.
    """
    key = unchanged_since(Path(target))
    if key in _verified:
        return Path(target)
    damage = damage_of(target)
    if damage is not None:
        raise DamagedOutput(damage)
    _verified.add(key)
    return Path(target)


def unchanged_since(target: Path) -> tuple:
    """What stat() says of ``target``, its files and its seal: equal only while none of them is rewritten."""
    files = [target, seal_path(target), *(target.rglob("*") if target.is_dir() else [])]
    return tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files if path.exists())


def damaged_outputs(root: str | Path) -> list[Damage]:
    """Sealed outputs under ``root`` whose files are missing or of another size (no checksums: fast)."""
    root = Path(root)
    if not root.is_dir():
        return []
    seals = sorted(root.rglob(f"{SEAL_PREFIX}*{SEAL_SUFFIX}"))
    found = (damage_of(sealed_target(seal), checksums=False) for seal in seals)
    return [damage for damage in found if damage is not None]


def set_aside(damaged: list[Damage]) -> list[str]:
    """Rename each damaged output to ``<name>.damaged`` (the run that remakes it does this before it starts);
    one line per output."""
    lines = []
    for damage in damaged:
        aside = damage.path.with_name(damage.path.name + ".damaged")
        if aside.is_dir():
            shutil.rmtree(aside)
        if damage.path.exists():
            os.replace(damage.path, aside)
        seal_path(damage.path).unlink(missing_ok=True)
        lines.append(f"{damage.what}: set aside as {aside}")
    return lines


def write_seal(target: Path, written: Path) -> None:
    seal = {"command": list(_command), "files": content_of(written)}
    tmp = seal_path(target).with_name(seal_path(target).name + ".tmp")
    tmp.write_text(json.dumps(seal, indent=1) + "\n")
    os.replace(tmp, seal_path(target))


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """ENOSPC anywhere in the chain, or a failed write (torch names no errno) on a nearly full disk."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES


@contextlib.contextmanager
def atomic_path(target: str | Path, seal: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; seal it and rename it onto ``target`` on success.

    A killed process leaves at most a stray temp file, never a truncated target; a full disk is
    reported naming ``target``. Works for files and for directories. Without ``seal`` (images, which
    no stage reads back through the seal) nothing is recorded beside the target.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / "tmp"
    try:
        try:
            yield tmp
            if seal and tmp.exists():
                write_seal(target, tmp)
        except (OSError, RuntimeError) as error:
            if not is_disk_full(error, target.parent):
                raise
            free = shutil.disk_usage(target.parent).free
            raise XmasError(
                f"no space left on the device while writing {target} ({free / 2**20:.1f} MiB free in "
                f"{target.parent}): nothing was half-written; free some space and run again"
            ) from error
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


@contextlib.contextmanager
def named_on_failure(path: Path, what: str, errors: tuple[type[BaseException], ...] = (Exception,)):
    """``errors`` raised inside, as a :class:`DamagedOutput` saying that ``path`` cannot be ``what``."""
    try:
        yield
    except XmasError:
        raise
    except errors as error:
        command = (read_seal(path) or {}).get("command", [])
        raise DamagedOutput(Damage(path, f"it cannot be {what} ({first_line(error)})", command)) from error


def read_checked(path: str | Path, reader: Callable, what: str):
    """``reader(path)`` on a verified ``path``; any failure to read it names the file."""
    path = verify(path)
    with named_on_failure(path, f"read as {what}"):
        return reader(path)


def read_parquet(path: str | Path, **options) -> pd.DataFrame:
    return read_checked(path, lambda checked: pd.read_parquet(checked, **options), "a Parquet table")


def read_table(path: str | Path) -> pa.Table:
    return read_checked(path, pq.read_table, "a Parquet table")


def read_json(path: str | Path):
    return read_checked(path, lambda checked: json.loads(checked.read_text(encoding="utf-8")), "JSON")


def load_torch(path: str | Path, **options):
    import torch

    return read_checked(path, lambda checked: torch.load(checked, **options), "a torch file")


def write_parquet(frame: pd.DataFrame | pa.Table, path: str | Path) -> None:
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def copy_sealed(sources: Iterable[str | Path], copies: Iterable[str | Path], log: str | Path) -> None:
    """Copy each verified file to its copy, sealed; each copy is a line of ``log``."""
    with open(log, "w", encoding="utf-8") as lines:
        for source, copy in zip(sources, copies, strict=True):
            with atomic_path(copy) as tmp:
                shutil.copyfile(verify(source), tmp)
            print(f"{source} -> {copy}", file=lines)


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_records(records: list[dict], path: str | Path) -> None:
    """Write a LLaVA-format JSON list, one record per line (diffable, loadable by json.load)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("[\n")
        for position, record in enumerate(records):
            out.write(json.dumps(record, ensure_ascii=False))
            out.write(",\n" if position < len(records) - 1 else "\n")
        out.write("]\n")


def write_raw_records(raw_records: Iterable[bytes], path: str | Path, lines: bool = False) -> int:
    """Write records given as their exact source bytes, streamed, as a JSON list (or, with ``lines``, as JSON
    Lines); returns how many.

    The records are not re-encoded, so each one is byte for byte what the source file holds.
    """
    written = 0
    opening, separator, closing = (b"", b"\n", b"\n") if lines else (b"[\n", b",\n", b"\n]\n")
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(opening)
        for raw in raw_records:
            if written:
                out.write(separator)
            out.write(raw)
            written += 1
        if written or not lines:
            out.write(closing)
    return written
