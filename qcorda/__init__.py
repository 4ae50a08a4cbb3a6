"""qcorda: quantization-aware adapter initialization (QCorDA, QPiSSA, LoftQ, ...) and fine-tuning.

``import qcorda`` stays light: torch, transformers, peft and bitsandbytes load on first use.
The Python API lives in its modules::

    from qcorda.config import CalibConfig, InitConfig
    from qcorda.prepare import prepare
    from qcorda.prepared import load_prepared

    cfg = InitConfig(method="qcorda-ipm", rank=16, calib=CalibConfig(data="gsm8k-train", fields=("question", "answer")))
    prepare("gemma-3-270m", cfg, out="prepared/")          # streamed: the model is never whole in memory
    model = load_prepared("prepared/")                     # the PeftModel over NF4, ready to train
"""

from __future__ import annotations

from .config import METHODS, CalibConfig, ConfigError, InitConfig

__version__ = "0.1.0"

__all__ = ["METHODS", "CalibConfig", "ConfigError", "InitConfig"]
