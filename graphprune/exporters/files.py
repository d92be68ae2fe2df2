"""Write files so that nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from graphprune.errors import ExportError


def check_writable(path: Path) -> None:
    """Fail early, before any work, when the folder of the file ``path`` cannot be created or written."""
    ensure_dir(Path(path).parent)


def ensure_dir(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the output folder {parent}: {err.strerror}") from err
    if not os.access(parent, os.W_OK):
        raise ExportError(f"the output folder {parent} is not writable")


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def staging_dir(target_dir: Path):
    """A temporary folder beside ``target_dir``; files are moved in by :func:`publish`. If the work fails, the
    folders this created for ``target_dir`` are removed again."""
    target_dir = Path(target_dir)
    with removed_on_failure(target_dir):
        ensure_dir(target_dir)
        tmp = Path(tempfile.mkdtemp(prefix=".graphprune-", dir=target_dir))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def removed_on_failure(folder: Path):
    """Remove the folders created from here on the way to ``folder`` if the work in the block fails (nothing
    half-written stays behind)."""
    top = None
    for p in (folder, *folder.parents):
        if p.exists():
            break
        top = p
    try:
        yield
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise


def publish(files: list[Path], target_dir: Path, last: Path | None = None) -> None:
    """Move staged files into ``target_dir``; ``last`` goes last so its presence means completeness."""
    ordered = [f for f in files if f != last] + ([last] if last else [])
    for f in ordered:
        try:
            os.replace(f, target_dir / f.name)
        except OSError as err:
            raise ExportError(f"cannot write {target_dir / f.name}: {err.strerror}") from err
