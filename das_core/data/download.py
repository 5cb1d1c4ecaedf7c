"""Downloading the public datasets and extracting them safely (needs internet).

``download_dataset(name, root)`` fetches each file of a dataset into ``root`` (a temporary
file renamed into place, so no partial download is ever left under the final name),
extracts archives member by member after checking each (no absolute paths, no ``..``, no
links leading outside, no device files), merges the result into ``root``, deletes the
archive and verifies the official layout with the dataset's own loader. Offline, it raises
a ``DatasetError`` naming the URL, the error and where to put the files by hand.
"""

from __future__ import annotations

import http.client
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from das_core.data.base import DatasetError, default_data_dir
from das_core.data.cars import locate_cars196
from das_core.data.cub import locate_cub200
from das_core.data.sop import locate_sop
from das_core.store.io import atomic_write

log = logging.getLogger(__name__)

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CARS_IMAGES_URL = "http://ai.stanford.edu/~jkrause/car196/car_ims.tgz"
CARS_ANNOS_URL = "http://ai.stanford.edu/~jkrause/car196/cars_annos.mat"
SOP_URL = "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip"

# name -> the files to fetch, in order; archives (.tgz, .tar.gz, .tar, .zip) are extracted.
URLS: dict[str, tuple[str, ...]] = {
    "cub200": (CUB_URL,),
    "cars196": (CARS_IMAGES_URL, CARS_ANNOS_URL),
    "sop": (SOP_URL,),
}
DOWNLOADABLE = (*URLS, "fashion-mnist")
TIMEOUT_S = 60.0
USER_AGENT = "das-explorer/0.1 (+python-urllib)"
CHUNK = 1 << 20

Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


@dataclass(frozen=True)
class _Target:
    title: str
    locate: Callable[[Path], Path]  # the dataset folder under root, or DatasetError
    manual: str  # how to place the files by hand; "{root}" is filled in


_TARGETS: dict[str, _Target] = {
    "cub200": _Target(
        "CUB-200-2011",
        locate_cub200,
        "extract CUB_200_2011.tgz into {root} (so that {root}/CUB_200_2011/images.txt exists)",
    ),
    "cars196": _Target(
        "CARS196",
        locate_cars196,
        "put cars_annos.mat and the extracted car_ims.tgz into {root} "
        "(so that {root}/cars_annos.mat and {root}/car_ims/000001.jpg exist)",
    ),
    "sop": _Target(
        "Stanford Online Products",
        locate_sop,
        "extract Stanford_Online_Products.zip into {root} "
        "(so that {root}/Stanford_Online_Products/Ebay_train.txt exists)",
    ),
}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}"


def fetch_url(
    url: str, target: Path, *, timeout: float = TIMEOUT_S, progress: Progress | None = None
) -> Path:
    """Download ``url`` to ``target`` through a temporary file beside it, renamed into place
    only when complete. Raises ``DatasetError`` naming the URL and the underlying error."""

    def write(tmp: Path) -> None:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "wb") as fh:
            length = resp.headers.get("Content-Length") if resp.headers is not None else None
            total = int(length) if length and length.isdigit() else None
            done = 0
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            if total is not None and done < total:
                raise OSError(f"the connection closed after {done} of {total} bytes")

    log.info("downloading %s -> %s", url, target)
    try:
        atomic_write(target, write)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise DatasetError(f"could not download {url}: {_reason(exc)}") from exc
    return target


def url_filename(url: str) -> str:
    name = posixpath.basename(urllib.parse.urlparse(url).path)
    if not name or name in (".", ".."):
        raise DatasetError(f"cannot tell a file name from the URL {url}")
    return name


_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar")


def archive_kind(filename: str) -> str | None:
    """``"tar"``, ``"zip"`` or ``None`` (not an archive), from the file name."""
    lower = filename.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith(_TAR_SUFFIXES):
        return "tar"
    return None


def archive_stem(filename: str) -> str:
    """``"car_ims.tgz"`` -> ``"car_ims"``: the folder the official archives extract to."""
    lower = filename.lower()
    for suffix in (".zip", *_TAR_SUFFIXES):
        if lower.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


_DRIVE = re.compile(r"^[A-Za-z]:")


def unsafe_name(name: str) -> str | None:
    """Why an archive member named ``name`` must not be extracted, or ``None`` if it may."""
    if not name or name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "an absolute path" if name else "an empty name"
    if ".." in re.split(r"[\\/]", name):
        return "a '..' component"
    return None


def _check_tar_member(member: tarfile.TarInfo) -> str | None:
    reason = unsafe_name(member.name)
    if reason:
        return reason
    if member.issym():
        link = member.linkname
        target = posixpath.normpath(posixpath.join(posixpath.dirname(member.name), link))
        if posixpath.isabs(link) or target == ".." or target.startswith("../"):
            return f"a symbolic link to {link!r}, outside the archive"
    elif member.islnk():
        if unsafe_name(member.linkname):
            return f"a hard link to {member.linkname!r}, outside the archive"
    elif not (member.isreg() or member.isdir()):
        return "a device, FIFO or other special file"
    return None


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # one pass: the archive is decompressed once
            reason = _check_tar_member(member)
            if reason:
                raise DatasetError(f"refusing to extract {archive}: member {member.name!r} is {reason}")
            tar.extract(member, dest, filter="data")


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            reason = unsafe_name(info.filename)
            if reason is None and stat.S_ISLNK(info.external_attr >> 16):
                reason = "a symbolic link"
            if reason:
                raise DatasetError(f"refusing to extract {archive}: member {info.filename!r} is {reason}")
            zf.extract(info, dest)


def _merge_into(src: Path, dst: Path) -> None:
    """Move the tree ``src`` into ``dst``, merging folders and replacing files."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir():
            _merge_into(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a tar or zip ``archive`` into ``dest`` after checking every member; returns the
    top-level entries it created. Nothing lands in ``dest`` unless the whole archive is safe
    and readable (it is extracted into a temporary folder inside ``dest`` first)."""
    kind = archive_kind(archive.name)
    if kind is None:
        raise DatasetError(f"{archive} is not a .tgz/.tar(.gz|.bz2|.xz)/.zip archive")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        try:
            (_extract_tar if kind == "tar" else _extract_zip)(archive, tmp)
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DatasetError(
                f"cannot extract {archive}: {_reason(exc)} (is the download complete?)"
            ) from exc
        top = sorted(e.name for e in tmp.iterdir())
        _merge_into(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [dest / n for n in top]


def _download_fashion_mnist(root: Path | None, force: bool) -> Path:
    from das_core.data import fashion_mnist

    if not force:
        found = fashion_mnist.locate_fashion_mnist(root)
        if found is not None:
            return found
    return fashion_mnist.download_fashion_mnist(root)


def download_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    force: bool = False,
    timeout: float = TIMEOUT_S,
    progress: Progress | None = None,
) -> Path:
    """Download and extract dataset ``name`` into ``root`` (default
    ``default_data_dir()/<name>``); returns the folder to pass as ``data_root``. Does nothing
    when ``root`` already holds the dataset, unless ``force``."""
    if name == "fashion-mnist":
        return _download_fashion_mnist(Path(root).expanduser() if root is not None else None, force)
    if name not in _TARGETS:
        raise DatasetError(f"cannot download {name!r}; downloadable datasets are: {', '.join(DOWNLOADABLE)}")
    spec = _TARGETS[name]
    folder = Path(root).expanduser() if root is not None else default_data_dir() / name
    manual = spec.manual.format(root=folder)
    if not force and folder.is_dir():
        try:
            return spec.locate(folder)
        except DatasetError:
            pass
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"{spec.title}: cannot create {folder}: {exc.strerror or exc}") from exc
    for url in URLS[name]:
        file = folder / url_filename(url)
        is_archive = archive_kind(file.name) is not None
        product = folder / archive_stem(file.name) if is_archive else file
        if not force and product.exists():  # e.g. car_ims/ from an earlier run (moved in whole)
            continue
        if force or not file.is_file():
            try:
                fetch_url(url, file, timeout=timeout, progress=progress)
            except DatasetError as exc:
                raise DatasetError(
                    f"{spec.title}: {exc}. If this machine is offline, fetch {url} elsewhere and {manual}"
                ) from exc
        if is_archive:
            log.info("extracting %s into %s", file, folder)
            try:
                safe_extract(file, folder)
            except DatasetError as exc:
                file.unlink(missing_ok=True)
                raise DatasetError(
                    f"{spec.title}: {exc}; removed {file.name}, run again to re-download"
                ) from exc
            file.unlink()
    try:
        return spec.locate(folder)
    except DatasetError as exc:
        raise DatasetError(
            f"{spec.title}: downloaded {', '.join(URLS[name])} into {folder}, but the result does not have "
            f"the expected layout ({exc})"
        ) from exc
