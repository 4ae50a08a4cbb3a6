"""``qcorda eval MODEL_OR_PREPARED [--adapter DIR] --tasks gsm8k,nq,ppl --limit N --out results.json``

``--harness TASKS`` runs lm-evaluation-harness tasks on the same loaded model (:mod:`qcorda.harness`)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_PREPARED",
                   help="HF model directory (fp16/fp32 or a merged export), hub id, gemma-3-270m, or a qcorda prepared directory (has qcorda.json)")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory (default for a prepared directory: its adapter_init)")
    p.add_argument("--tasks", default=None, help="comma-separated: gsm8k, nq, ppl (default all; none when --harness is given)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of gsm8k, nq and each --harness task (default all)")
    p.add_argument("--out", default=None, help="write the JSON results here (default: print only)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward / generate call")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda when present)")
    g = p.add_argument_group("gsm8k")
    g.add_argument("--gsm8k-data", default="gsm8k-test", help="file or bundled alias with question/answer (default gsm8k-test)")
    g.add_argument("--shots", type=int, default=0, help="solved training examples before each question (default 0: the training prompt)")
    g.add_argument("--gsm8k-max-new-tokens", type=int, default=256)
    g = p.add_argument_group("nq")
    g.add_argument("--nq-data", default="nq-open", help="file or bundled alias with question/answer list (default nq-open)")
    g.add_argument("--nq-max-new-tokens", type=int, default=24)
    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl-data", default="wikitext2", help="text file or bundled alias (default wikitext2)")
    g.add_argument("--ppl-tokens", type=int, default=8192, help="score the first N tokens (0: all)")
    g.add_argument("--ppl-window", type=int, default=512)
    g.add_argument("--ppl-stride", type=int, default=256)
    g = p.add_argument_group("lm-evaluation-harness (optional extra: pip install -e \".[harness]\")")
    g.add_argument("--harness", default=None, metavar="TASKS",
                   help="comma-separated lm-eval task names (gsm8k; lm-eval fetches the data), task YAML paths, "
                        "or the bundled offline tasks qcorda_gsm8k, qcorda_nq_open")
    g.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for --harness tasks (default: each task's own)")
    g.add_argument("--gen-kwargs", default=None, help="lm-eval generation overrides for --harness tasks, e.g. max_gen_toks=64")
    p.add_argument("--trust-remote-code", action="store_true")


def run(args) -> int:
    from ..config import ConfigError
    from ..evaluate import evaluate, load_for_eval, parse_tasks, write_results
    from ..table import print_table

    tasks = parse_tasks(args.tasks) if args.tasks is not None or not args.harness else ()  # fail before loading the model
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.shots < 0:
        raise ConfigError(f"--shots must be >= 0, got {args.shots}")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit must be positive, got {args.limit}")
    if args.num_fewshot is not None and not args.harness:
        raise ConfigError("--num-fewshot applies to --harness tasks; the built-in gsm8k takes --shots")
    harness = loaded = None
    if args.harness:
        from ..harness import load_tasks, parse_harness_tasks, require_lm_eval

        require_lm_eval()
        names = parse_harness_tasks(args.harness)
        loaded = load_tasks(names)  # unknown names and unreachable datasets fail before the model loads
    model, tok, kind = load_for_eval(args.model, args.adapter, args.device, args.trust_remote_code)
    results = {} if not tasks else evaluate(
        model, tok, tasks, limit=args.limit, batch_size=args.batch_size, echo=True,
        gsm8k_data=args.gsm8k_data, gsm8k_shots=args.shots, gsm8k_max_new_tokens=args.gsm8k_max_new_tokens,
        nq_data=args.nq_data, nq_max_new_tokens=args.nq_max_new_tokens,
        ppl_data=args.ppl_data, ppl_max_tokens=args.ppl_tokens or None, ppl_window=args.ppl_window, ppl_stride=args.ppl_stride,
    )
    if args.harness:
        from ..harness import run_harness

        harness = run_harness(model, tok, names, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                              loaded=loaded, gen_kwargs=args.gen_kwargs)
        print(harness.summary(), flush=True)
    if args.out:
        write_results(args.out, results, {"model": str(args.model), "adapter": args.adapter, "kind": kind, "limit": args.limit}, harness=harness)
    rows = []
    for task, r in results.items():
        for metric, value in r.metrics.items():
            rows.append([task, metric, value, r.n, r.seconds])
    for task, h in (harness.headline.items() if harness else ()):
        rows.append([f"harness:{task}", h["metric"], h["value"], h["n"], harness.seconds])
    title = f"eval {args.model}" + (f" + {args.adapter}" if args.adapter else "") + f" ({kind})" + (f" -> {args.out}" if args.out else "")
    print_table(["task", "metric", "value", "n", "seconds"], rows, title=title)
    return 0
