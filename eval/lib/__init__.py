"""What the scripts under ``eval/`` share. Everything here uses qcorda's public API only.

Measuring (:mod:`eval.lib.measure`)
    ``peak_rss_mb()``      this process's peak RSS in MiB (``VmHWM``; ``ru_maxrss`` where /proc is missing)
    ``rss_mb()``           its RSS now, in MiB (``VmRSS``)
    ``reset_peak_rss()``   reset ``VmHWM`` to the current RSS (Linux ``clear_refs``); False where refused
    ``timed(fn, device)``  ``(fn(), seconds)``, CUDA synchronized before and after
    ``environment()``      dict of the machine and software (cores, RAM, GPU, torch, threads, TF32 setting, load, UTC)
    ``machine(env=None)``  the same as one line for a results markdown

Results (:mod:`eval.lib.results`)
    ``Results(stem, key=None)``   ``stem.json`` + ``stem.md`` (a bare name lies under ``eval/results/``)
        ``.load()``               the saved document when its ``key`` matches, else ``{"key": key}``: resume from it
        ``.save(doc, markdown)``  JSON, then markdown, each written atomically (:func:`qcorda.io.write_text_atomic`)
    ``RESULTS``                   the ``eval/results`` directory

Synthetic checkpoints and layers (:mod:`eval.lib.synthetic`)
    ``llama_shape(params, hidden)``                       layers / intermediate of a Llama of about ``params``
    ``write_synthetic_llama(out, params, hidden, tokenizer=None, seed=0)``
                                                          a bf16 Llama-shaped checkpoint, one shard per block; returns its shape
    ``synthetic_weight(out_f, in_f, seed)``, ``synthetic_cov(in_f, seed)``   one layer's W and C

Child processes (:mod:`eval.lib.children`)
    ``run_child(module, *args, env=None)``  ``python -m module args`` from the repo root; returns the JSON of its last stdout line
    ``emit(result)``                        print that line (the child's side)
    ``child_env(**extra)``                  the child's environment (repo importable, hub offline, no tokenizer threads)

Decomposition against PEFT (:mod:`eval.lib.peft_decompose`)
    ``bench_decompose(rank, shapes, device="cpu")``, ``decompose_table(rows)``, ``corda_low_rank(eig, rank, device)``

Directories compared tensor by tensor (:mod:`eval.lib.tensors`)
    ``prepared_tensors(directory)``    ``{name: tensor}`` of a model directory's shards
    ``equal_fraction(a, b, keys)``     ``(fraction of equal bytes, values compared)`` over ``keys``

Test models live in the package, :mod:`qcorda.testing` (``qcorda.testing.tiny``), which tests and eval both import.
"""

from .children import child_env, emit, run_child
from .measure import environment, machine, peak_rss_mb, reset_peak_rss, rss_mb, timed
from .peft_decompose import bench_decompose, corda_low_rank, decompose_table
from .results import RESULTS, Results
from .synthetic import llama_shape, synthetic_cov, synthetic_weight, write_synthetic_llama
from .tensors import equal_fraction, prepared_tensors

__all__ = ["RESULTS", "Results", "bench_decompose", "child_env", "corda_low_rank", "decompose_table", "emit", "environment",
           "equal_fraction", "prepared_tensors",
           "llama_shape", "machine", "peak_rss_mb", "reset_peak_rss", "rss_mb", "run_child", "synthetic_cov", "synthetic_weight",
           "timed", "write_synthetic_llama"]
