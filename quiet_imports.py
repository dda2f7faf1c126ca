"""Keeps torchao's import-time noise off stderr: a leaf module, imported before transformers.

transformers imports torchao whenever it is installed (requirements.txt installs it for quantize.py),
at its first model import, and torchao 0.18 then logs warnings on CPU-only machines. Importing this
module installs a logging filter for exactly those messages (idempotent); nothing else is filtered.
"""

import logging


class _TorchaoImportNoise(logging.Filter):
    """Drops the warnings torchao 0.18 logs on import on CPU-only machines: one per optional CUDA/MXFP8
    extension it cannot load ("Failed to load .../torchao/_C_....so"), and torch 2.13's deprecation
    notice for its enums ("... is an Enum subclass ... register_constant()"). Nothing else."""

    def filter(self, record):
        msg = record.getMessage()
        if msg.startswith("Failed to load") and "torchao" in msg and ".so" in msg:
            return False
        return "is an Enum subclass and is now natively supported by torch.compile" not in msg


def quiet_torchao_import() -> None:
    """Install `_TorchaoImportNoise` (idempotent). transformers imports torchao whenever it is installed,
    at its first model import, so the CLIs call this before importing transformers to keep stderr clean."""
    for name in ("torchao", "torch.utils._pytree"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _TorchaoImportNoise) for f in lg.filters):
            lg.addFilter(_TorchaoImportNoise())


quiet_torchao_import()
