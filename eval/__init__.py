"""Benchmarks and studies of qcorda, run from the repository root as ``python -m eval.<name>``.

They use qcorda's public API only (no private names, no monkeypatching, no edits of the import path);
what they share lives in :mod:`eval.lib`. Results go to ``eval/results/`` (markdown + JSON).
This package is not part of the wheel.
"""
