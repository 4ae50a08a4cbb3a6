"""``qcorda eval MODEL_OR_PREPARED [--adapter DIR] --tasks gsm8k,nq,ppl --limit N --out results.json``

``--harness TASKS`` runs lm-evaluation-harness tasks on the same loaded model (:mod:`qcorda.harness`)."""

from __future__ import annotations

import argparse

from ..config import EvalConfig
from .flags import add_config, build


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_PREPARED",
                   help="HF model directory (fp16/fp32 or a merged export), hub id, gemma-3-270m, or a qcorda prepared directory (has qcorda.json)")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory (default for a prepared directory: its adapter_init)")
    p.add_argument("--out", default=None, help="write the JSON results here (default: print only)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(_flags=add_config(p, EvalConfig))


def run(args) -> int:
    from ..evaluate import evaluate, load_for_eval, write_results
    from ..table import print_table

    cfg: EvalConfig = build(args, args._flags)  # bad flags fail before the model loads
    harness = loaded = None
    if cfg.harness:
        from ..harness import load_tasks, parse_harness_tasks, require_lm_eval

        require_lm_eval()
        names = parse_harness_tasks(cfg.harness)
        loaded = load_tasks(names)  # unknown names and unreachable datasets fail before the model loads
    model, tok, kind = load_for_eval(args.model, args.adapter, cfg.device, args.trust_remote_code, cfg.dtype)
    results = evaluate(model, tok, cfg, echo=True)
    if cfg.harness:
        from ..harness import run_harness

        harness = run_harness(model, tok, names, limit=cfg.limit, num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size,
                              loaded=loaded, gen_kwargs=cfg.gen_kwargs)
        print(harness.summary(), flush=True)
    if args.out:
        write_results(args.out, results, {"model": str(args.model), "adapter": args.adapter, "kind": kind, "limit": cfg.limit}, harness=harness)
    rows = []
    for task, r in results.items():
        for metric, value in r.metrics.items():
            rows.append([task, metric, value, r.n, r.seconds])
    for task, h in (harness.headline.items() if harness else ()):
        rows.append([f"harness:{task}", h["metric"], h["value"], h["n"], harness.seconds])
    title = f"eval {args.model}" + (f" + {args.adapter}" if args.adapter else "") + f" ({kind})" + (f" -> {args.out}" if args.out else "")
    print_table(["task", "metric", "value", "n", "seconds"], rows, title=title)
    return 0
