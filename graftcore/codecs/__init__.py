"""The codec layer: every stored weight format behind one protocol (`registry.Codec`) and one registry keyed by
format. A new format is one module here, registered by its import below, and its tests.

Example:
    >>> from graftcore.codecs import codec_for_config
    >>> codec_for_config({"quant_method": "compressed-tensors", "format": "float-quantized"}, "config.json").name
    'float-quantized'
"""

from graftcore.codecs import fp8, packed4  # noqa: F401  (register their codecs)
from graftcore.codecs.registry import (
    Codec,
    Encoder,
    QuantFormat,
    codec_for_config,
    codec_named,
    codec_of,
    companion_suffixes,
    register,
)

BUILTIN = ("fp8", "packed4")  # the codec modules of this package, each registering its codecs when imported

__all__ = [
    "Codec",
    "Encoder",
    "QuantFormat",
    "codec_for_config",
    "codec_named",
    "codec_of",
    "companion_suffixes",
    "register",
]
