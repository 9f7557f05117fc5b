"""prefstream: continual learning from user feedback on LLM outputs.

This package holds the ``prefstream`` command and, under ``prefstream/<area>/v1``, the gRPC/protobuf
stubs generated from ``proto/`` (regenerate with ``make protos``; never edit them by hand).
"""

__version__ = "0.1.0"
