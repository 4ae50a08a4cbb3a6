"""qcorda: quantization-aware adapter initialization (QCorDA, QPiSSA, LoftQ, ...) and fine-tuning.

``import qcorda`` stays light: torch, transformers, peft and bitsandbytes load on first use.
The Python API lives in its modules::

    from qcorda.prepare import prepare, save_prepared, load_prepared
"""

from __future__ import annotations

from .config import METHODS, CalibConfig, ConfigError, InitConfig

__version__ = "0.1.0"

__all__ = ["METHODS", "CalibConfig", "ConfigError", "InitConfig"]
