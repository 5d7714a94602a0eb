"""Writing outputs so that nothing a user types destroys data, and an interrupted run leaves no half-written file.

Every output directory is written to a temporary sibling and renamed into place; an existing output is renamed
aside first and deleted only once the new one is in (:func:`atomic_dir`). Before any work, :func:`check_output`
refuses an output that is, contains or lies inside an input, that would replace something that is not a qavtp
output of the same kind, or that cannot be written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qavtp.errors import QavtpError

# What an existing directory must hold to be replaced by a new output of the same kind.
MARKERS = {
    "artifact": ("config.json", "quantized.safetensors"),
    "export": ("export.json",),
    "results": ("results.json",),
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path) -> None:
    # mkdtemp/mkstemp create private (0700/0600) entries; an output gets the modes any other tool would give it.
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _usual_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; on success it takes ``path``'s place.

    An existing ``path`` is renamed aside, the new directory renamed in, and only then the old one deleted, so an
    interrupt at any point leaves one complete output (the old one is renamed back if the new one never landed).
    On any error (or interrupt) the temporary directory is removed.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    old = None
    try:
        yield tmp
        for p in (tmp, *tmp.rglob("*")):
            if not p.is_symlink():
                _usual_mode(p)
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)  # the new output never landed: the old one stays
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _related(out: Path, given: Path) -> str | None:
    if out == given:
        return "is"
    if given.is_relative_to(out):
        return "contains"
    if out.is_relative_to(given):
        return "lies inside"
    return None


def check_output(
    output: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False
) -> Path:
    """Refuse, in one line and before any work, an ``output`` directory of ``kind`` (a key of :data:`MARKERS`) that
    is, contains or lies inside one of ``inputs``, that exists without ``overwrite``, that is not a directory, that
    holds something other than a qavtp output of the same kind, or whose location cannot be written."""
    out = Path(output)
    where = out.resolve()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise QavtpError(f"output directory {out} exists; pass --overwrite to replace it")
    for given in inputs:
        if given is None or str(given) == "":
            continue
        how = _related(where, Path(given).resolve())
        if how:
            raise QavtpError(f"output {out} {how} the input {given}; write the output somewhere else")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise QavtpError(f"output directory {out} exists; pass --overwrite to replace it")
        if out.is_symlink() or not out.is_dir():
            raise QavtpError(f"output {out} exists and is not a directory; refusing to replace it")
        held = list(out.iterdir())
        if held and not all((out / m).is_file() for m in MARKERS[kind]):
            raise QavtpError(
                f"output {out} is not a qavtp {kind} (no {' + '.join(MARKERS[kind])}); refusing to replace it"
            )
    check_writable(out.parent, out)
    return out


def check_writable(directory: str | os.PathLike, output: str | os.PathLike | None = None) -> None:
    """The nearest existing ancestor of ``directory`` (where ``output`` goes) must be a writable directory."""
    d = Path(directory).absolute()
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise QavtpError(f"cannot create {output or d}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise QavtpError(f"cannot write to {probe}: permission denied")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """The file's SHA-256, read in 16 MiB chunks: memory stays flat for multi-GiB weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextmanager
def disk_full_is_one_line(out: Path, what: str) -> Iterator[None]:
    """A full disk, a quota or a file-size cap while writing ``out`` becomes one :class:`QavtpError` line (the
    caller's :func:`atomic_dir` has removed the partial output by then)."""
    try:
        yield
    except Exception as e:  # OSError, or safetensors' Rust error naming the OS error in its message
        code = e.errno if isinstance(e, OSError) else _os_error_in(str(e))
        if code not in FULL_DISK:
            raise
        raise QavtpError(f"could not write the {what} to {out}: {os.strerror(code)}") from None


def _os_error_in(message: str) -> int | None:
    m = re.search(r"os error (\d+)", message)
    return int(m.group(1)) if m else None
