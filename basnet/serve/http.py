"""The masking API's requests and answers, as plain functions (no Ray, no web framework, no torch).

``POST /mask`` takes the image as the raw body or as the ``file`` field of a multipart form, with
``?format=``, ``?threshold=``, ``?refine=``, ``?normalize=`` and ``?on_no_object=`` as the bulk job's
``--format``, ``--threshold``, ``--refine``, ``--normalize`` and ``--on-no-object``. Every problem a
request can have becomes a ``RequestError`` with its HTTP status and a one-line message naming the
fix, answered as JSON ``{"error": ...}``: 400 for bytes that do not decode and for bad parameters,
413 above ``--max-bytes`` or ``--max-pixels``, 415 for a body that says it is not an image. A
request is checked and decoded on its own before it joins a batch, so a bad one never reaches the
model and never touches the others in its batch.
"""

from __future__ import annotations

import email.policy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from email.parser import BytesParser

import numpy as np

from basnet.imaging import FORMATS, REFINES, ImageDecodeError, ImageTooLargeError, decode_for_model
from basnet.imaging import default_refine as format_default_refine
from basnet.quality import NORMALIZES, ON_NO_OBJECT

__all__ = ["RequestError", "MaskRequest", "Upload", "mask_options", "read_upload", "decode_upload", "error_json",
           "OPTIONS"]

OPTIONS = ("format", "threshold", "refine", "normalize", "on_no_object")  # the query parameters of POST /mask
# Besides image/*: untyped bytes, a form, and curl's default for --data-binary (the bytes as they are).
_IMAGE_TYPES = ("application/octet-stream", "multipart/form-data", "application/x-www-form-urlencoded")
_SEND = "send the image's bytes as the body (image/jpeg, image/png, ...) or as a multipart form's 'file' field"


class RequestError(Exception):
    """A request the service refuses: ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class MaskRequest:
    """What a POST /mask asks for."""

    format: str
    threshold: float
    refine: str = "none"
    normalize: str = "minmax"
    on_no_object: str = "keep"


@dataclass
class Upload:
    """One decoded image: ``image`` resized to the model's side, the original size, the bytes for rgba."""

    data: bytes
    image: np.ndarray
    height: int
    width: int
    filename: str = ""


def error_json(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def mask_options(query: Mapping[str, str], *, default_format: str = "mask", default_threshold: float = 0.5,
                 default_refine: str | None = None, default_normalize: str = "minmax",
                 default_on_no_object: str = "keep") -> MaskRequest:
    """``?format=``, ``?threshold=``, ``?refine=``, ``?normalize=`` and ``?on_no_object=`` checked as the
    bulk job checks its flags. ``default_refine``: the service's ``--refine`` (None: the format's
    default, as in the bulk job)."""
    unknown = sorted(set(query) - set(OPTIONS))
    if unknown:
        raise RequestError(400, f"unknown parameter {unknown[0]!r}: POST /mask takes {', '.join(OPTIONS)}")
    fmt = query.get("format", default_format)
    if fmt not in FORMATS:
        raise RequestError(400, f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    text = query.get("threshold")
    threshold = default_threshold
    if text is not None:
        try:
            threshold = float(text)
        except ValueError:
            threshold = float("nan")
        if not 0.0 <= threshold <= 1.0:  # NaN fails too
            raise RequestError(400, f"threshold {text!r} is not a number in [0, 1]")
    refine = query.get("refine", default_refine or format_default_refine(fmt))
    if refine not in REFINES:
        raise RequestError(400, f"refine {refine!r} is not one of {', '.join(REFINES)}")
    normalize = query.get("normalize", default_normalize)
    if normalize not in NORMALIZES:
        raise RequestError(400, f"normalize {normalize!r} is not one of {', '.join(NORMALIZES)}")
    on_no_object = query.get("on_no_object", default_on_no_object)
    if on_no_object not in ON_NO_OBJECT:
        raise RequestError(400, f"on_no_object {on_no_object!r} is not one of {', '.join(ON_NO_OBJECT)}")
    return MaskRequest(fmt, threshold, refine, normalize, on_no_object)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def read_upload(body: bytes, content_type: str) -> tuple[bytes, str]:
    """The image's bytes and file name from a raw body or a multipart form's ``file`` field.

    Raises:
        RequestError: 415 for a body (or form field) typed as something other than an image; 400
            for an empty body, a form without ``file``, or a malformed form.
    """
    media = _media_type(content_type)
    if media and not (media.startswith("image/") or media in _IMAGE_TYPES):
        raise RequestError(415, f"Content-Type {media} is not an image: {_SEND}")
    if media == "multipart/form-data":
        body, filename, part_type = _form_file(body, content_type)
        if part_type and not (part_type.startswith("image/") or part_type == "application/octet-stream"):
            raise RequestError(415, f"the form's file {filename!r} is {part_type}, not an image: {_SEND}")
    else:
        filename = ""
    if not body:
        raise RequestError(400, f"empty body: {_SEND}")
    return body, filename


def _form_file(body: bytes, content_type: str) -> tuple[bytes, str, str]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    malformed = RequestError(400, "malformed multipart form (check its boundary): " + _SEND)
    try:
        message = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        if not message.is_multipart() or message.defects:
            raise malformed
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "file":
                payload = part.get_payload(decode=True) or b""
                return payload, part.get_filename() or "", _media_type(part.get("content-type", ""))
    except RequestError:
        raise
    except Exception:  # a hostile form (e.g. nested a thousand deep) is the client's error, never a 500
        raise malformed from None
    raise RequestError(400, "the multipart form has no 'file' field: " + _SEND)


def decode_upload(data: bytes, *, size: int, max_pixels: int, reduced: bool = True, filename: str = "") -> Upload:
    """Decodes (EXIF orientation applied; a large JPEG at a reduced scale unless ``reduced`` is off)
    and resizes one image for the model, as the bulk job does.

    Raises:
        RequestError: 413 above ``max_pixels``; 400 for bytes that are not a decodable image.
    """
    try:
        decoded = decode_for_model(data, size, max_pixels=max_pixels, reduced=reduced)
    except ImageTooLargeError as exc:
        raise RequestError(413, f"{exc}: send a smaller image") from None
    except ImageDecodeError as exc:
        raise RequestError(400, f"cannot decode the image: {exc}") from None
    return Upload(data, decoded.image, decoded.height, decoded.width, filename)
