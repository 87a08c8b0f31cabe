"""A small client for the masking service (standard library only): ``mask(url, image) -> PNG bytes``.

    from basnet.client import mask, mask_with_quality
    png = mask("http://127.0.0.1:8000", "photo.jpg", format="rgba")
    png, quality = mask_with_quality("http://127.0.0.1:8000", "photo.jpg")  # {"confidence": 0.93, "no_object": False}
"""

from __future__ import annotations

import json
import mimetypes
import os
import urllib.error
import urllib.parse
import urllib.request

__all__ = ["mask", "mask_with_quality", "MaskingError"]


class MaskingError(RuntimeError):
    """The service refused or failed a request: ``status`` (0 if it could not be reached) and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message = status, message


def _endpoint(url: str, options: dict) -> str:
    base = url if url.rstrip("/").endswith("/mask") else url.rstrip("/") + "/mask"
    query = {k: v for k, v in options.items() if v is not None}
    return base + ("?" + urllib.parse.urlencode(query) if query else "")


def mask(url: str, image: str | os.PathLike | bytes, *, format: str | None = None, threshold: float | None = None,
         refine: str | None = None, normalize: str | None = None, on_no_object: str | None = None,
         timeout: float = 300.0) -> bytes:
    """The PNG the service at ``url`` returns for ``image`` (a path or the file's bytes).

    Args:
        url: The service's address (``http://host:8000``) or its ``/mask`` endpoint.
        image: A local file's path, or encoded image bytes.
        format: ``mask``, ``binary`` or ``rgba`` (default: the service's).
        threshold: The binary threshold in [0, 1] (default: the service's).
        refine: ``none`` or ``guided`` (default: the service's).
        normalize: ``minmax`` or ``none`` (default: the service's).
        on_no_object: ``keep`` or ``empty`` (default: the service's).
        timeout: Seconds to wait for the answer.

    Raises:
        MaskingError: The service answered with an error (its status and message) or could not be reached.
    """
    return mask_with_quality(url, image, format=format, threshold=threshold, refine=refine, normalize=normalize,
                             on_no_object=on_no_object, timeout=timeout)[0]


def mask_with_quality(url: str, image: str | os.PathLike | bytes, *, format: str | None = None,
                      threshold: float | None = None, refine: str | None = None, normalize: str | None = None,
                      on_no_object: str | None = None, timeout: float = 300.0) -> tuple[bytes, dict]:
    """:func:`mask`'s PNG and how sure the model was of it: ``{"confidence": float, "no_object": bool}``
    (the bulk job's manifest figures, from the answer's headers)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data, kind = bytes(image), "application/octet-stream"
    else:
        with open(image, "rb") as f:
            data = f.read()
        guessed = mimetypes.guess_type(os.fspath(image))[0] or ""
        kind = guessed if guessed.startswith("image/") else "application/octet-stream"  # the service decodes it
    options = {"format": format, "threshold": threshold, "refine": refine, "normalize": normalize,
               "on_no_object": on_no_object}
    request = urllib.request.Request(_endpoint(url, options), data=data,
                                     method="POST", headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body, headers = response.read(), response.headers
            quality = {"confidence": float(headers.get("X-Mask-Confidence", "nan")),
                       "no_object": headers.get("X-Mask-No-Object") == "true"}
            return body, quality
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            message = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            message = body.decode(errors="replace")[:500] or exc.reason
        raise MaskingError(exc.code, message) from None
    except urllib.error.URLError as exc:
        raise MaskingError(0, f"cannot reach {url}: {exc.reason}") from None
    except OSError as exc:  # a timeout or a reset while the answer was read
        raise MaskingError(0, f"no answer from {url}: {exc}") from None
