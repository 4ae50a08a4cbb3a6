"""Does the adapter initialization change what fine-tuning learns and forgets?

Gemma-3-270M; qlora, qpissa, qcorda-ipm (calibrated on GSM8K train) and qcorda-kpm
(calibrated on NQ-open questions), all at the same rank, are prepared over NF4 and
trained with the same short schedule on GSM8K train (same seed, same data order for
every method). Before and after training we measure:

- GSM8K test accuracy on a subset (greedy, the training prompt);
- held-out GSM8K answer loss (teacher-forced NLL per token of gold test solutions);
- NQ-open gold-answer log-likelihood (knowledge retention; max over accepted answers,
  mean per-token log-prob) and NQ exact match;
- wikitext-2 perplexity (sliding window).

Each seed changes the training data order (the inits are prepared once, seed 0). Results go to
``eval/results/forgetting.md`` (table + reproduce command) and ``forgetting.json``.

The training loop is :func:`train_adapter`, a minimal plain-torch loop kept as one
function so that qcorda's trainer can replace it.

    PYTHONPATH=$PWD python eval/study_forgetting.py --rank 16 --steps 30 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcorda.config import CalibConfig, InitConfig  # noqa: E402

CALIB = {
    "qcorda-ipm": dict(data="gsm8k-train", fields=("question", "answer")),
    "qcorda-kpm": dict(data="nq-open", fields=("question",)),
}


def dequantize_base(model):
    """Replace every frozen ``Linear4bit`` base layer by an fp32 ``Linear`` holding its dequantized
    weight, in place. On a CPU with fp32 compute, bitsandbytes dequantizes the NF4 weight to fp32 on
    every call and multiplies by it, so forward and backward use the same numbers; the study only
    avoids redoing that dequantization at every step (~10x faster here)."""
    import bitsandbytes.functional as F

    for name, mod in model.named_modules():
        base = getattr(mod, "base_layer", None)
        if type(base).__name__ != "Linear4bit":
            continue
        W = F.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=base.bias is not None, device=W.device)
        lin.weight = torch.nn.Parameter(W, requires_grad=False)
        if base.bias is not None:
            lin.bias = torch.nn.Parameter(base.bias.detach().float(), requires_grad=False)
        mod.base_layer = lin
    return model


def train_adapter(model, tok, examples, steps: int, batch_size: int, lr: float, seed: int, max_length: int, progress: bool = True) -> list[float]:
    """AdamW on the LoRA parameters, loss = mean NLL of the completion tokens (prompt masked).

    The order of ``examples`` is a permutation drawn from ``seed`` alone, so every method
    sees the same batches. Returns the loss per step. Swap for ``qcorda.train`` when it lands.
    """
    from tqdm.auto import tqdm

    from qcorda.evaluate import encode_pairs, masked_nll

    g = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < steps * batch_size:
        order += torch.randperm(len(examples), generator=g).tolist()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))  # short warmup
    eos = tok.eos_token or ""
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="train", disable=not progress)
    for step in bar:
        batch = [examples[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        ids, att, lab = encode_pairs(tok, [e.prompt for e in batch], [e.completion + eos for e in batch], max_length)
        sums, counts = masked_nll(model, ids, att, lab)
        loss = sums.sum() / counts.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def measure(model, tok, args) -> dict:
    from qcorda.data import format_record, load_records
    from qcorda.evaluate import completion_logprobs, gsm8k, nq, perplexity

    out = {}
    if args.gsm8k_limit:
        g = gsm8k(model, tok, limit=args.gsm8k_limit, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
        out["gsm8k_acc"] = g.metrics["accuracy"]
        out["gsm8k_outputs"] = [s["output"] for s in g.samples[:3]]
    else:  # generation skipped (too slow for the machine)
        out["gsm8k_acc"] = float("nan")
    held = [format_record(r, ("question", "answer")) for r in load_records("gsm8k-test")[: args.loss_limit]]
    lls = completion_logprobs(model, tok, [e.prompt for e in held], [e.completion for e in held], args.eval_batch_size, desc="gsm8k held-out loss")
    out["gsm8k_loss"] = -sum(ll for ll, _ in lls) / sum(n for _, n in lls)
    q = nq(model, tok, limit=args.nq_limit, batch_size=args.eval_batch_size, generate_answers=args.nq_generate)
    out["nq_em"] = q.metrics["exact_match"] if args.nq_generate else float("nan")
    out["nq_logprob"] = q.metrics["gold_logprob"]
    out["ppl"] = perplexity(model, tok, max_tokens=args.ppl_tokens, batch_size=max(1, args.eval_batch_size // 2)).metrics["ppl"]
    print({k: v for k, v in out.items() if k != "gsm8k_outputs"}, flush=True)
    return out


def prepare_method(method: str, args, work: Path) -> Path:
    from qcorda.prepare import load_model, prepare, save_prepared

    out = work / method
    if (out / "qcorda.json").exists():
        return out
    calib = CalibConfig(samples=args.calib_samples, max_length=256, batch_size=8, **CALIB.get(method, {}))
    cfg = InitConfig(method=method, rank=args.rank, calib=calib, compute_dtype="float32", seed=0)
    model, tok = load_model("gemma-3-270m")
    peft_model = prepare(model, cfg, tokenizer=tok)
    save_prepared(peft_model, out, tok, overwrite=True)
    return out


def fmt_pm(values: list[float], digits: int = 3) -> str:
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def write_report(path: Path, res: dict, args, argv: list[str], seconds: float) -> None:
    metrics = [("gsm8k_acc", "GSM8K acc", 3), ("gsm8k_loss", "GSM8K held-out loss", 3), ("nq_em", "NQ EM", 3), ("nq_logprob", "NQ gold log-lik", 3), ("ppl", "wikitext-2 ppl", 2)]
    lines = ["# Forgetting study: Gemma-3-270M, NF4 + LoRA adapters trained on GSM8K", ""]
    lines += ["Reproduce (from the repository root):", "", "```", "PYTHONPATH=$PWD python eval/study_forgetting.py " + " ".join(shlex.quote(a) for a in argv), "```", ""]
    lines += [
        f"Setup: rank {args.rank} (alpha = r) on all linear layers, fp32 compute, {args.steps} steps x batch {args.batch_size} "
        f"(lr {args.lr}, AdamW, max length {args.max_length}) on the bundled GSM8K train (alpaca prompt, loss on the answer), "
        f"seeds {args.seeds} (data order). qcorda-ipm calibrated on {args.calib_samples} GSM8K-train question+answer texts, "
        f"qcorda-kpm on {args.calib_samples} NQ-open questions. Evaluation: GSM8K accuracy on the first {args.gsm8k_limit} test questions "
        f"(greedy, {args.max_new_tokens} new tokens), held-out loss on the first {args.loss_limit} test solutions (NLL/token), "
        f"NQ-open on the first {args.nq_limit} dev questions (gold log-lik = mean over questions of the max over accepted answers of "
        f"the per-token log-prob), wikitext-2 perplexity on the first {args.ppl_tokens} tokens (window 512, stride 256). "
        + ("The frozen NF4 base runs as fp32 Linear layers holding exactly its dequantized weights (`--dequantized-base`: "
           "the numbers bitsandbytes' fp32-compute Linear4bit multiplies by, without re-dequantizing at every step). " if args.dequantized_base else "")
        + f"Values after training are mean ± half the range over the seeds. Wall time {seconds / 60:.0f} min on 2 shared CPU cores.",
        "",
    ]
    base = res.get("fp32")
    if base:
        lines += ["Unquantized fp32 Gemma-3-270M (reference): " + ", ".join(f"{name} {base[k]:.{d}f}" for k, name, d in metrics), ""]
    header = ["method", "when"] + [name for _, name, _ in metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in args.methods:
        r = res["methods"].get(method)
        if not r:
            continue
        lines.append("| " + " | ".join([method, "init"] + [f"{r['before'][k]:.{d}f}" for k, _, d in metrics]) + " |")
        after = r["after"]
        if after:
            lines.append("| " + " | ".join([method, "trained"] + [fmt_pm([a[k] for a in after.values()], d) for k, _, d in metrics]) + " |")
    lines += ["", "Change from init to trained (mean over seeds; NQ log-lik and ppl measure forgetting):", ""]
    lines += ["| method | Δ GSM8K loss | Δ NQ gold log-lik | Δ ppl | final train loss |", "|---|---|---|---|---|"]
    for method in args.methods:
        r = res["methods"].get(method)
        if not r or not r["after"]:
            continue
        b, after = r["before"], list(r["after"].values())
        d = lambda k: [a[k] - b[k] for a in after]
        final = [a["train_loss"][-5:] for a in after]
        lines.append(f"| {method} | {fmt_pm(d('gsm8k_loss'))} | {fmt_pm(d('nq_logprob'))} | {fmt_pm(d('ppl'), 2)} | {fmt_pm([sum(f) / len(f) for f in final])} |")
    lines += ["", "## Reading", "", "READING_PLACEHOLDER", ""]
    old = path.read_text() if path.exists() else ""
    if "## Reading" in old and "READING_PLACEHOLDER" not in old:  # keep a hand-written reading
        lines[-2] = old.split("## Reading", 1)[1].strip()
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="qlora,qpissa,qcorda-ipm,qcorda-kpm")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--gsm8k-limit", type=int, default=20, help="GSM8K questions to generate for (0: skip accuracy)")
    p.add_argument("--nq-generate", action=argparse.BooleanOptionalAction, default=True, help="generate NQ answers for exact match")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--loss-limit", type=int, default=50)
    p.add_argument("--nq-limit", type=int, default=50)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--dequantized-base", action=argparse.BooleanOptionalAction, default=True,
                   help="run the frozen NF4 base as fp32 Linear layers holding its dequantized weights (same numbers, faster on CPU)")
    p.add_argument("--no-fp32-reference", action="store_true", help="skip evaluating the unquantized model")
    p.add_argument("--report-only", action="store_true", help="rebuild the markdown from the saved JSON")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "qcorda" / "study_forgetting"))
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "forgetting.md"))
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from qcorda.data import load_examples
    from qcorda.evaluate import load_for_eval
    from qcorda.prepare import load_prepared

    t0 = time.perf_counter()
    work = Path(args.work) / f"r{args.rank}"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw_path = out.with_suffix(".json")
    res = {"args": {k: v for k, v in vars(args).items()}, "methods": {}}

    def save():
        res["seconds"] = time.perf_counter() - t0
        raw_path.write_text(json.dumps(res, indent=2))
        write_report(out, res, args, argv, time.perf_counter() - t0)

    if args.report_only:
        saved = json.loads(raw_path.read_text())
        saved_argv = saved.get("argv") or [a for a in argv if a != "--report-only"]
        sargs = p.parse_args(saved_argv)
        sargs.methods = [m.strip() for m in sargs.methods.split(",") if m.strip()]
        sargs.seeds = [int(x) for x in sargs.seeds.split(",") if x.strip()]
        write_report(out, saved, sargs, saved_argv, saved.get("seconds", 0.0))
        print(out.read_text())
        return 0
    res["argv"] = argv

    if not args.no_fp32_reference:
        print("== fp32 reference", flush=True)
        model, tok, _ = load_for_eval("gemma-3-270m")
        res["fp32"] = measure(model, tok, args)
        del model
        save()
    train = load_examples("gsm8k-train", ("question", "answer"), "alpaca")
    for method in args.methods:
        print(f"== {method}", flush=True)
        prepared = prepare_method(method, args, work)
        model, tok, _ = load_for_eval(prepared)
        if args.dequantized_base:
            dequantize_base(model)
        entry = res["methods"][method] = {"before": measure(model, tok, args), "after": {}}
        del model
        save()
        for seed in args.seeds:
            print(f"== {method} seed {seed}", flush=True)
            torch.manual_seed(seed)
            model = load_prepared(prepared, is_trainable=True)
            if args.dequantized_base:
                dequantize_base(model)
            losses = train_adapter(model, tok, train, args.steps, args.batch_size, args.lr, seed, args.max_length)
            m = measure(model, tok, args)
            m["train_loss"] = losses
            entry["after"][str(seed)] = m
            del model
            save()
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
