"""How much faster than PEFT's ``pissa_niter_4`` can qcorda's randomized PiSSA split be at ≤ 1 % error?

Both are randomized SVDs (``torch.svd_lowrank``): PEFT uses q = r columns and 4 power
iterations, qcorda q = r + oversample columns and ``--svd-power-iters``. Each power iteration is
two passes over W, so the time is bounded by the passes, and fewer passes cost accuracy. This
sweep times both on the Llama-7B shapes (synthetic weights of :func:`eval.lib.synthetic_weight`,
r = 64, CPU fp32, one thread) and prints qcorda's speedup and its ‖W − B·A‖_F relative to PEFT's.

Usage: ``OMP_NUM_THREADS=1 python -m eval.pissa_power_sweep`` (writes eval/results/pissa_power_sweep.{md,json})
"""

from __future__ import annotations

import sys
import time

import torch

from .lib import Results, environment, machine, synthetic_weight

SETTINGS = [(16, 4), (16, 2), (32, 2), (16, 1), (32, 1), (64, 1), (64, 0)]  # (oversample, power iterations)


def main() -> int:
    from peft import LoraConfig, get_peft_model

    from qcorda.decompose import svd_split
    from qcorda.table import markdown_table, print_table

    torch.set_num_threads(1)
    env = environment()
    r, rows = 64, []
    for out_f, in_f in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        W = synthetic_weight(out_f, in_f, 0)
        m = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False))
        m[0].weight.data = W.clone()
        t = time.perf_counter()
        pm = get_peft_model(m, LoraConfig(r=r, lora_alpha=r, target_modules=["0"], init_lora_weights="pissa_niter_4"))
        t_peft = time.perf_counter() - t
        layer = pm.base_model.model[0]
        e_peft = (W - layer.lora_B["default"].weight @ layer.lora_A["default"].weight).norm().item()
        for oversample, power in SETTINGS:
            t = time.perf_counter()
            split = svd_split(W, r, 1.0, "top", solver="randomized", oversample=oversample, power_iters=power, seed=0)
            t_q = time.perf_counter() - t
            e_q = (W - split.B @ split.A).norm().item()
            rows.append([f"{out_f}x{in_f}", oversample, power, t_peft, t_q, t_peft / t_q, 100 * (e_q - e_peft) / e_peft])
    head = ["shape", "oversample", "power iters", "PEFT pissa_niter_4 s", "qcorda s", "speedup", "err diff %"]
    print_table(head, rows, title="qcorda randomized PiSSA vs PEFT pissa_niter_4, r=64")
    text = ["# qcorda randomized PiSSA split vs PEFT `pissa_niter_4`", "", f"Machine: {machine(env)}, 1 thread.", "",
            "Command: `OMP_NUM_THREADS=1 python -m eval.pissa_power_sweep`. 'err diff' is qcorda's ‖W − B·A‖_F "
            "relative to PEFT's (negative = better); one repeat per cell.", "", markdown_table(head, rows), ""]
    out = Results("pissa_power_sweep")
    out.save({"env": env, "head": head, "rows": rows}, "\n".join(text))
    print(f"wrote {out.md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
