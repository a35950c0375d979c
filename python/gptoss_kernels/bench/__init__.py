"""`gptoss-kernels bench`: microbenchmarks of the kernels and of the model end to end.

- ``cli``: the command (``register(subparsers)``).
- ``ops``: op cases (MoE, router, attention decode/prefill), verified against the reference, timed
  beside their baselines.
- ``timing``: CUDA-event / CUDA-graph timing with cold L2, and the card's measured limits.
- ``e2e``: the model end to end, and the bytes-per-token arithmetic (``decode_bytes_per_token``).
- ``report``: the JSON document and the printed tables.

Kept light: importing this package does not import torch-heavy modules until a command runs.
"""

from .shapes import ModelShape, decode_bytes_per_step, decode_bytes_per_token

__all__ = ["ModelShape", "decode_bytes_per_step", "decode_bytes_per_token"]
