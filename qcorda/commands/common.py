"""Flags shared by several verbs: the initialization settings (:class:`qcorda.config.InitConfig`)."""

from __future__ import annotations

import argparse

from ..config import InitConfig
from .flags import Flags, add_config

#: How InitConfig's nested fields appear as flags: calib.samples → --calib-samples, but calib.template → --template.
INIT_PREFIXES = {"calib.": "calib-"}
INIT_RENAME = {"calib.template": "--template"}


def add_init_arguments(p: argparse.ArgumentParser, default: InitConfig | None = None, skip: tuple[str, ...] = ()) -> Flags:
    """The flags of :class:`InitConfig` (and its calibration), documented by the fields' docstrings."""
    flags = add_config(p, InitConfig, default=default, prefixes=INIT_PREFIXES, rename=INIT_RENAME, skip=skip, title="initialization")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model repo")
    return flags
