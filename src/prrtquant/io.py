"""Small I/O helpers: outputs are written under a temporary name and renamed when complete."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import CorruptImageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed earlier attempt
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the result the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block succeeds it replaces ``path``
    (an existing ``path`` is removed only then), when it fails it is deleted and ``path`` is untouched.
    Temporary folders of an earlier attempt that was killed (``.{name}.tmp-*``) are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):  # left by a killed earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: others of the group could not read results
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_dicom_file(path: str | Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def json_ready(o: Any) -> Any:
    """A copy of ``o`` that :func:`json.dumps` writes as strict JSON: NaN and ±inf become null, numpy
    scalars Python numbers, tuples lists (dict keys become strings)."""
    if isinstance(o, dict):
        return {str(k): json_ready(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_ready(v) for v in o]
    if hasattr(o, "tolist") and getattr(o, "ndim", 0) > 0:  # numpy arrays
        return json_ready(o.tolist())
    if hasattr(o, "item") and not isinstance(o, (str, bytes)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as strict, indented JSON (the one JSON writer of prrtquant's outputs): NaN and ±inf as
    null, numpy values as numbers, anything else JSON does not know (dates, paths) as its text."""
    p = Path(path)
    p.write_text(json.dumps(json_ready(obj), indent=1, default=str))
    return p


#: A stage output folder holding only this file records that the stage failed on this patient's data.
FAILED = "FAILED.json"


def read_failure(folder: str | Path) -> dict[str, Any] | None:
    """The failure record of a stage output folder (``stage``, ``error``, ``upstream``), or None."""
    p = Path(folder) / FAILED
    if not p.is_file():
        return None
    return dict(json.loads(p.read_text()))


def write_failure(folder: str | Path, stage: str, error: str, upstream: bool = False) -> None:
    """Replace ``folder`` (atomically) by a folder holding only the failure record."""
    with atomic_directory(folder) as tmp:
        write_json(tmp / FAILED, {"status": "failed", "stage": stage, "error": error, "upstream": upstream})


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_of(path: str | Path) -> Path:
    """The JSON sidecar of an image: ``x.nii.gz`` -> ``x.json``."""
    p = Path(path)
    return p.with_name(p.name.replace(".nii.gz", ".json") if p.name.endswith(".nii.gz") else p.stem + ".json")


def check_nifti(path: str | Path) -> None:
    """Refuse a NIfTI file whose size does not match its header, or whose bytes differ from the SHA-256
    its sidecar records (``sha256``, written by ingest).

    ITK reads a truncated ``.nii.gz`` as an image padded with zeros; the gzip trailer's ISIZE (the
    uncompressed length mod 2**32, the last four bytes of a one-member gzip file as written here) must
    equal the header's ``vox_offset + voxels * bytes per voxel``.
    """
    import struct
    import zlib

    import nibabel as nib

    p = Path(path)
    try:
        size = p.stat().st_size
        img = nib.load(str(p))  # header only; nibabel keeps the on-disk data offset on the array proxy
        hdr = img.header
        expected = int(img.dataobj.offset) + int(math.prod(int(d) for d in hdr.get_data_shape())) * (
            int(hdr["bitpix"]) // 8)
        if p.name.endswith(".gz"):
            with open(p, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                isize = struct.unpack("<I", fh.read(4))[0]
            ok, held = size > 18 and isize == expected % 2**32, isize
        else:
            ok, held = size >= expected, size
    except (OSError, EOFError, ValueError, struct.error, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise CorruptImageError(f"{p}: not a readable NIfTI image ({exc})") from exc
    if not ok:
        raise CorruptImageError(f"{p}: truncated or damaged (it holds {held} bytes uncompressed where its header "
                                f"describes {expected}); rerun the stage that wrote it")
    side = sidecar_of(p)
    if side.exists():
        try:
            want = json.loads(side.read_text()).get("sha256")
        except (OSError, ValueError):
            want = None
        if want and sha256_of(p) != want:
            raise CorruptImageError(f"{p}: its bytes differ from the SHA-256 recorded in {side.name} (modified "
                                    f"or damaged since it was written); rerun the stage that wrote it (edited on "
                                    f"purpose? put its new SHA-256 into the sidecar's sha256)")


def read_image(path: str | Path, pixel_type: int | None = None) -> Any:
    """A stage intermediate as a SimpleITK image, after :func:`check_nifti`; errors name the file."""
    import SimpleITK as sitk

    check_nifti(path)
    try:
        return sitk.ReadImage(str(path), pixel_type) if pixel_type is not None else sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CorruptImageError(f"{path}: cannot be read as an image ({str(exc).strip().splitlines()[-1]})") from exc
