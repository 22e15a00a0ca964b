"""CLIP encoders: the one loader, and reading images as RGB."""

from xm.encoders.device import CPU, Device
from xm.encoders.images import IMAGE_SUFFIXES, load_image, to_rgb
from xm.encoders.loader import Encoder, EncoderSpec, availability_problem, load_encoder
from xm.encoders.precision import DEFAULT_PRECISION, PRECISIONS, Precision

__all__ = ["availability_problem", "CPU", "DEFAULT_PRECISION", "Device", "Encoder", "EncoderSpec", "IMAGE_SUFFIXES",
           "load_encoder", "load_image", "Precision", "PRECISIONS", "to_rgb"]
