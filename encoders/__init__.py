"""CLIP encoders: the one loader, and reading images as RGB."""

from xm.encoders.images import IMAGE_SUFFIXES, load_image, to_rgb
from xm.encoders.loader import (DEFAULT_PRECISION, PRECISIONS, Encoder, EncoderSpec, availability_problem,
                                check_precision, load_encoder)

__all__ = ["availability_problem", "check_precision", "DEFAULT_PRECISION", "Encoder", "EncoderSpec", "IMAGE_SUFFIXES",
           "load_encoder", "load_image", "PRECISIONS", "to_rgb"]
