"""Test models for qcorda's tests and benchmarks (as ``torchao.testing``): importable from an installed
package, so ``tests/`` and ``eval/`` share them without importing each other.

:mod:`qcorda.testing.tiny`: tiny random Llama / Qwen2 / Gemma-3 / GPT-2 models and a 384-token BPE
tokenizer trained on the bundled data, for fast CPU tests.
"""
