"""msk: turn an archive of musculoskeletal radiographs into diagnostic tools, on Ray."""

__version__ = "0.1.0"
