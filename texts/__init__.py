"""Text sets for CODER: building them from their sources (names, a DCLIP-format descriptions
file, WordNet, the memory's captions) and the JSON file `xm texts` writes (docs/coder.md)."""

from xm.texts.build import (
    ANALOGOUS_TEMPLATE,
    ATTRIBUTE_TEMPLATE,
    DEFAULT_NAME_TEMPLATE,
    NAME_TEMPLATES,
    SOURCE_NAMES,
    TextOptions,
    build_textset,
)
from xm.texts.descriptions import Descriptions, read_descriptions
from xm.texts.textset import FORMAT, KINDS, MAX_KINDS, MEAN_KINDS, VECTOR_KINDS, Text, TextSet, read_textset

__all__ = ["ANALOGOUS_TEMPLATE", "ATTRIBUTE_TEMPLATE", "DEFAULT_NAME_TEMPLATE", "Descriptions", "FORMAT", "KINDS",
           "MAX_KINDS", "MEAN_KINDS", "NAME_TEMPLATES", "SOURCE_NAMES", "Text", "TextOptions", "TextSet",
           "VECTOR_KINDS", "build_textset", "read_descriptions", "read_textset"]
