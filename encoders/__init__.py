"""CLIP encoders: the one loader, and reading images as RGB."""

from xm.encoders.images import IMAGE_SUFFIXES, load_image, to_rgb
from xm.encoders.loader import Encoder, EncoderSpec, availability_problem, load_encoder

__all__ = ["availability_problem", "Encoder", "EncoderSpec", "IMAGE_SUFFIXES", "load_encoder", "load_image", "to_rgb"]
