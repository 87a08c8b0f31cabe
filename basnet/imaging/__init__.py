"""Image input and output, one home for every job: decoding every photo format (reduced for the
model where the format allows), rendering maps at full size, and encoding masks and cut-outs.
No Ray, no torch: the same code runs in Ray Data tasks, model replicas, the service and tests."""

from basnet.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    FORMATS_BY_SUFFIX,
    HEIF_SUPPORT,
    IMAGE_SUFFIXES,
    REDUCED_DECODE_FACTOR,
    Decoded,
    ImageDecodeError,
    ImageTooLargeError,
    decode_for_model,
    decode_image,
    decode_mask,
    decode_rgb,
    has_image_suffix,
    image_suffix,
)
from basnet.imaging.encode import ENCODINGS, SUFFIXES, encode, encode_png
from basnet.imaging.render import FORMATS, REFINES, default_refine, render_output, to_grey, upsample

__all__ = ["DEFAULT_MAX_PIXELS", "FORMATS_BY_SUFFIX", "HEIF_SUPPORT", "IMAGE_SUFFIXES", "REDUCED_DECODE_FACTOR",
           "Decoded", "ImageDecodeError", "ImageTooLargeError", "decode_for_model", "decode_image", "decode_mask",
           "decode_rgb", "has_image_suffix", "image_suffix", "ENCODINGS", "SUFFIXES", "encode", "encode_png",
           "FORMATS", "REFINES", "default_refine", "render_output", "to_grey", "upsample"]
