"""Output names for bulk masking: each input's mask mirrors its relative path, safely.

An input at relative path ``a/b/x.jpg`` (relative to the input folder, the manifest's folder or
``--root``) gets its mask at ``<output>/a/b/x.png`` (``x.webp`` for WebP cut-outs). When two inputs
of one folder share a stem (``x.jpg`` and ``x.png``), the first in sorted order keeps ``x.png`` and
the others get their full name plus ``.png`` (``x.png.png``). A tar shard ``a/s-000.tar`` holding ``img/x.jpg`` gets
``<output>/a/s-000/img/x.png``. Names holding ``..`` are refused; leading ``/``, empty and ``.``
parts are dropped and control characters become ``_``, so every output path stays under ``--output``.
"""

from __future__ import annotations

from basnet import storage

__all__ = ["UnsafeNameError", "safe_parts", "clean_part", "printable", "OutputNames", "canonical", "is_under",
           "output_uri"]


class UnsafeNameError(ValueError):
    """An input name that cannot be mapped to an output path under ``--output``."""


def clean_part(part: str) -> str:
    """Control characters and undecodable bytes (surrogates from tar) become ``_``."""
    if part.isprintable():  # the common case, checked in C
        return part
    return "".join("_" if ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF else c
                   for c in part)


def safe_parts(name: str) -> list[str]:
    """Splits a relative name into path parts that cannot leave the folder they are joined to.

    ``\\`` counts as a separator; leading ``/``, empty and ``.`` parts are dropped; control
    characters become ``_``.

    Raises:
        UnsafeNameError: The name holds a ``..`` part, or nothing is left of it.
    """
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeNameError(f"unsafe name {printable(name)!r}: '..' would leave --output")
    if not parts:
        raise UnsafeNameError(f"unusable name {printable(name)!r}")
    return [clean_part(p) for p in parts]


def printable(text: str) -> str:
    """A string that Arrow and terminals accept: undecodable bytes shown as ``\\xNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # surrogates: bytes a tar member name or a file name could not decode
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class OutputNames:
    """Assigns each input a distinct output name (``suffix``: ``.png``, or ``.webp`` for WebP
    cut-outs) relative to the output root."""

    def __init__(self, suffix: str = ".png") -> None:
        self.taken: set[str] = set()
        self.suffix = suffix

    def claim(self, relative: str) -> str:
        """Returns the output's relative path for an input's relative path.

        Raises:
            UnsafeNameError: Unsafe name, or both candidate names are taken.
        """
        parts = safe_parts(relative)
        return self.claim_in("/".join(parts[:-1]), parts[-1])

    def claim_in(self, folder: str, name: str) -> str:
        """:meth:`claim` for a name already made safe (one part of :func:`safe_parts`) in a folder
        already made safe (its parts joined with ``/``; empty for the root)."""
        stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
        for candidate in (stem + self.suffix, name + self.suffix):
            path = f"{folder}/{candidate}" if folder else candidate
            if path not in self.taken:
                self.taken.add(path)
                return path
        raise UnsafeNameError(f"output name {path} is taken by another input")


def canonical(uri: str) -> str:
    """A URI in the form ``storage.list_files`` returns, so listed outputs compare equal."""
    uri = str(uri)
    if storage.is_s3(uri):
        return uri.rstrip("/")
    _, path = storage.filesystem(uri)
    return "file://" + path if uri.startswith("file://") else path


def _scheme(uri: str) -> str:
    return "s3" if storage.is_s3(uri) else "file"


def is_under(uri: str, root: str) -> bool:
    if _scheme(uri) != _scheme(root):
        return False
    try:
        storage.relative_to(uri, root)
        return True
    except storage.StorageError:
        return False


def output_uri(output_root: str, relative: str) -> str:
    """Joins a safe relative path onto the output root, checking the result stays below it."""
    uri = storage.join(output_root, *relative.split("/"))
    if not is_under(uri, output_root):  # belt and braces: safe_parts already guarantees it
        raise UnsafeNameError(f"{printable(relative)!r} would leave --output")
    return uri
