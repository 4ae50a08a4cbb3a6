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
import os
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


def train_adapter(model, tok, examples, steps: int, batch_size: int, lr: float, seed: int, max_length: int,
                  max_grad_norm: float = 0.3, progress: bool = True) -> list[float]:
    """AdamW (torch, fp32 states) on the LoRA parameters at a constant learning rate, gradient
    clipping ``max_grad_norm``; loss = mean NLL over the completion tokens of the batch (prompt
    masked, EOS appended) -- the objective TRL's SFTTrainer optimizes in :func:`qcorda.train.train`
    (``--check-loop`` measures that both give the same losses).

    The order of ``examples`` is a permutation drawn from ``seed`` alone, so every method
    sees the same batches. Returns the loss per step.
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
    eos = tok.eos_token or ""
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="train", disable=not progress, mininterval=10)
    for step in bar:
        batch = [examples[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        ids, att, lab = encode_pairs(tok, [e.prompt for e in batch], [e.completion + eos for e in batch], max_length)
        sums, counts = masked_nll(model, ids, att, lab)
        loss = sums.sum() / counts.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def check_loop(args, work: Path) -> dict:
    """Same prepared qlora model, same 4 records, 3 steps: per-step losses of :func:`train_adapter`
    over the dequantized base vs :func:`qcorda.train.train` (TRL SFTTrainer, NF4 ``Linear4bit``
    base, gradient checkpointing, the CPU recipe with optim=adamw_torch). With ``data.limit=4`` and
    batch 2 x grad_accum 2 every step sees the same 4 records in both loops, so the order cannot differ."""
    from transformers import AutoTokenizer

    from qcorda.data import load_examples
    from qcorda.prepare import load_prepared
    from qcorda.recipe import load_recipe
    from qcorda.train import train as qtrain

    prepared = prepare_method("qlora", args, work)
    steps, max_length = 3, args.check_max_length
    out_dir = work / "check_loop_trl"
    recipe = load_recipe(ROOT / "recipes" / "gemma3-270m-cpu.yaml", [
        "init=null", f"prepared={prepared}", f"output_dir={out_dir}", "data.limit=4", f"train.max_steps={steps}",
        f"train.learning_rate={args.lr}", f"train.max_length={max_length}", "train.optim=adamw_torch", "train.resume=false",
        "train.logging_steps=1", "train.save_steps=1000",
    ])
    t = time.perf_counter()
    qtrain(recipe, progress=False)
    trl_s = time.perf_counter() - t
    trl = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    trl_losses = [float(h["loss"]) for h in trl if "loss" in h][:steps]
    tok = AutoTokenizer.from_pretrained(str(prepared))
    examples = load_examples("gsm8k-train", ("question", "answer"), "alpaca", 4)
    torch.manual_seed(0)
    model = dequantize_base(load_prepared(prepared, is_trainable=True))
    t = time.perf_counter()
    ours = train_adapter(model, tok, examples, steps, 4, args.lr, 0, max_length, progress=False)
    ours_s = time.perf_counter() - t
    r = {"steps": steps, "max_length": max_length, "lr": args.lr, "trl_losses": trl_losses, "study_losses": ours,
         "trl_seconds": trl_s, "study_seconds": ours_s}
    print("check-loop", r, flush=True)
    return r


def measure(model, tok, args, accuracy: bool = False) -> dict:
    """The cheap metrics; GSM8K accuracy (generation, the slow part on this CPU) only with ``accuracy``."""
    from qcorda.data import format_record, load_records
    from qcorda.evaluate import completion_logprobs, nq, perplexity

    out = {"gsm8k_acc": None}
    if accuracy:
        out.update(gsm8k_accuracy(model, tok, args))
    else:
        held = [format_record(r, ("question", "answer")) for r in load_records("gsm8k-test")[: args.gsm8k_limit]]
        lls = completion_logprobs(model, tok, [e.prompt for e in held], [e.completion for e in held], args.eval_batch_size, desc="gsm8k held-out loss")
        out["gsm8k_loss"] = -sum(ll for ll, _ in lls) / sum(n for _, n in lls)
    q = nq(model, tok, limit=args.nq_limit, batch_size=args.eval_batch_size, generate_answers=args.nq_generate)
    out["nq_em"] = q.metrics["exact_match"] if args.nq_generate else float("nan")
    out["nq_logprob"] = q.metrics["gold_logprob"]
    out["ppl"] = perplexity(model, tok, max_tokens=args.ppl_tokens, batch_size=max(1, args.eval_batch_size // 4)).metrics["ppl"]
    print({k: v for k, v in out.items() if k not in ("gsm8k_outputs", "gsm8k_preds")}, flush=True)
    return out


def gsm8k_accuracy(model, tok, args) -> dict:
    """Greedy GSM8K accuracy on the first ``gsm8k_limit`` test questions (and, from the same call,
    the teacher-forced answer loss): :func:`qcorda.evaluate.gsm8k`."""
    from qcorda.evaluate import gsm8k

    g = gsm8k(model, tok, limit=args.gsm8k_limit, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
    return {"gsm8k_acc": g.metrics["accuracy"], "gsm8k_loss": g.metrics["answer_nll"],
            "gsm8k_preds": [s["pred"] for s in g.samples], "gsm8k_outputs": [s["output"] for s in g.samples[:2]]}


def prepare_method(method: str, args, work: Path) -> Path:
    """Prepare ``method`` at ``args.rank`` once (cached under ``work/method``). qcorda-kpm is
    calibrated on the LAST ``calib_samples`` NQ-open questions, so that no evaluated question
    (the first ``nq_limit``) is among them."""
    from qcorda.data import load_records
    from qcorda.prepare import load_model, prepare, save_prepared

    out = work / (f"{method}-calib{args.calib_samples}" if method in CALIB else method)  # calibration changes the init
    if (out / "qcorda.json").exists():
        return out
    calib = dict(CALIB.get(method, {}))
    if method == "qcorda-kpm":
        records = load_records("nq-open")
        if args.calib_samples + args.nq_limit > len(records):
            raise SystemExit(f"--calib-samples + --nq-limit exceed the {len(records)} bundled NQ-open questions")
        path = work / "nq_calib.jsonl"
        path.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in records[-args.calib_samples :]))
        calib["data"] = str(path)
    calib = CalibConfig(samples=args.calib_samples, max_length=128, batch_size=8, **calib)
    cfg = InitConfig(method=method, rank=args.rank, calib=calib, compute_dtype="float32", seed=0)
    model, tok = load_model("gemma-3-270m")
    peft_model = prepare(model, cfg, tokenizer=tok)
    save_prepared(peft_model, out, tok, overwrite=True)
    return out


def fmt_pm(values: list, digits: int = 3) -> str:
    """mean ± half the range; "n/m" (not measured) when a value is missing."""
    if not values or any(v is None for v in values):
        return "n/m"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def write_report(path: Path, res: dict, args, argv: list[str], seconds: float) -> None:
    metrics = [("gsm8k_acc", "GSM8K acc", 3), ("gsm8k_loss", "GSM8K held-out loss", 3), ("nq_em", "NQ EM", 3),
               ("nq_logprob", "NQ gold log-lik", 3), ("ppl", "wikitext-2 ppl", 2)]
    if not args.nq_generate:
        metrics = [m for m in metrics if m[0] != "nq_em"]
    lines = ["# Forgetting study: Gemma-3-270M, NF4 + LoRA adapters trained on GSM8K", ""]
    lines += ["Reproduce (from the repository root; resumable, finished (method, seed) results are kept in forgetting.json):", "",
              "```", "PYTHONPATH=$PWD python eval/study_forgetting.py " + " ".join(shlex.quote(a) for a in argv), "```", ""]
    loads = [r.get("load") for r in res.get("runs", []) if r.get("load")]
    lines += [
        "## Setup",
        "",
        f"- Adapters: rank {args.rank} (alpha = r) on q/k/v/o/gate/up/down of all 18 layers, over the NF4 (blocksize 64, double quant) "
        "residual; qcorda-ipm calibrated on the first "
        f"{args.calib_samples} GSM8K-train question+answer texts, qcorda-kpm on the last {args.calib_samples} NQ-open questions "
        f"(none of them among the evaluated ones), max length 128. Inits are prepared once (seed 0).",
        f"- Training: the CPU recipe's optimizer settings (`recipes/gemma3-270m-cpu.yaml`: constant lr {args.lr}, no warmup, "
        f"clip {args.max_grad_norm}, no weight decay, max length {args.max_length}, alpaca prompt, loss on the answer + EOS) "
        f"but torch AdamW and a shorter schedule: {args.steps} steps x batch {args.batch_size} drawn from the first {args.train_limit} "
        f"GSM8K-train records. The seed sets the data order (a permutation from that seed alone), identical for every method.",
        "- Loop: `train_adapter` in this script (plain torch). "
        + ("The frozen NF4 base runs as fp32 Linear layers holding exactly its dequantized weights (the numbers bitsandbytes' "
           "fp32-compute Linear4bit multiplies by), without re-dequantizing at every step. " if args.dequantized_base else ""),
        f"- Evaluation (greedy, fp32): GSM8K accuracy on the first {args.gsm8k_limit} test questions (zero-shot, the training "
        f"prompt, up to {args.max_new_tokens} new tokens, stop after the `#### N` line); held-out GSM8K answer loss = NLL per token "
        f"of the gold solutions of the same {args.gsm8k_limit} questions, teacher-forced; NQ-open on the first {args.nq_limit} "
        "questions: gold log-lik = mean over questions of the max over accepted answers of the mean per-token log-prob"
        + ("" if args.nq_generate else " (exact match not generated: near 0 for this model, see `qcorda eval --tasks nq`)")
        + f"; wikitext-2 perplexity on the first {args.ppl_tokens} test tokens (window 512, stride 256).",
        f"- After-training values: mean ± half the range over seeds {args.seeds}. "
        f"Wall time {seconds / 60:.0f} min on 2 CPU cores shared with 3 other jobs"
        + (f" (load average at the saves {min(l[0] for l in loads):.1f}-{max(l[0] for l in loads):.1f})" if loads else "") + ".",
        "",
    ]
    chk = res.get("check_loop")
    if chk and "error" not in chk:
        lines += [
            "Check of the loop against `qcorda.train` (`--check-loop`): the same prepared qlora model, the first 4 GSM8K-train "
            f"records, max length {chk['max_length']}, {chk['steps']} steps (recipe batch 2 x grad_accum 2 = the same 4 records every "
            "step; optim=adamw_torch):",
            "",
            "| step | qcorda.train (TRL, NF4 Linear4bit, grad. checkpointing) | train_adapter (dequantized base) | abs diff |",
            "|---|---|---|---|",
        ]
        for i, (a, b) in enumerate(zip(chk["trl_losses"], chk["study_losses"])):
            lines.append(f"| {i + 1} | {a:.4f} | {b:.4f} | {abs(a - b):.1e} |")
        lines += ["", f"Time for these {chk['steps']} steps: qcorda.train {chk['trl_seconds']:.0f} s, train_adapter {chk['study_seconds']:.0f} s.", ""]
    elif chk:
        lines += [f"Check of the loop against qcorda.train failed: {chk['error']}", ""]
    base = res.get("fp32")
    if base:
        lines += ["Unquantized fp32 Gemma-3-270M (reference): " + ", ".join(f"{name} {fmt_pm([base[k]], d)}" for k, name, d in metrics), ""]
    lines += ["## Results", ""]
    header = ["method", "when"] + [name for _, name, _ in metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in args.methods:
        r = res["methods"].get(method)
        if not r or not r.get("before"):
            continue
        lines.append("| " + " | ".join([method, "init"] + [fmt_pm([r["before"][k]], d) for k, _, d in metrics]) + " |")
        after = r["after"]
        if after:
            lines.append("| " + " | ".join([method, f"trained ({len(after)} seeds)"] + [fmt_pm([a[k] for a in after.values()], d) for k, _, d in metrics]) + " |")
    lines += ["", "Change from init to trained (mean ± half range over seeds; a lower NQ log-lik or a higher ppl is forgetting):", ""]
    lines += ["| method | Δ GSM8K acc | Δ GSM8K loss | Δ NQ gold log-lik | Δ ppl | mean train loss, last 3 steps |", "|---|---|---|---|---|---|"]
    for method in args.methods:
        r = res["methods"].get(method)
        if not r or not r.get("before") or not r["after"]:
            continue
        b, after = r["before"], list(r["after"].values())
        d = lambda k: [None if a[k] is None or b[k] is None else a[k] - b[k] for a in after]
        final = [a["train_loss"][-3:] for a in after]
        lines.append(f"| {method} | {fmt_pm(d('gsm8k_acc'))} | {fmt_pm(d('gsm8k_loss'))} | {fmt_pm(d('nq_logprob'))} | {fmt_pm(d('ppl'), 2)} | {fmt_pm([sum(f) / len(f) for f in final])} |")
    lines += ["", "Training loss per step (seed: losses):", ""]
    for method in args.methods:
        r = res["methods"].get(method)
        for seed, a in (r or {}).get("after", {}).items():
            lines.append(f"- {method} seed {seed}: " + " ".join(f"{x:.2f}" for x in a["train_loss"]))
    lines += ["", "## Reading", "", "READING_PLACEHOLDER", ""]
    old = path.read_text() if path.exists() else ""
    if "## Reading" in old and "READING_PLACEHOLDER" not in old:  # keep a hand-written reading
        lines[-2] = old.split("## Reading", 1)[1].strip()
    path.write_text("\n".join(lines))


#: Arguments that change the numbers: a cached result is reused only when all of them match.
RESULT_KEYS = ("rank", "steps", "batch_size", "lr", "max_grad_norm", "max_length", "train_limit", "calib_samples",
               "gsm8k_limit", "max_new_tokens", "nq_limit", "nq_generate", "ppl_tokens", "dequantized_base", "eval_batch_size")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="qlora,qpissa,qcorda-ipm,qcorda-kpm")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4, help="constant, as in recipes/gemma3-270m-cpu.yaml")
    p.add_argument("--max-grad-norm", type=float, default=0.3)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--train-limit", type=int, default=200, help="training pool: the first N GSM8K-train records (the CPU recipe's data.limit)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--gsm8k-limit", type=int, default=16, help="GSM8K test questions (accuracy and held-out answer loss)")
    p.add_argument("--nq-generate", action=argparse.BooleanOptionalAction, default=False, help="also generate NQ answers for exact match")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--nq-limit", type=int, default=48)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--dequantized-base", action=argparse.BooleanOptionalAction, default=True,
                   help="run the frozen NF4 base as fp32 Linear layers holding its dequantized weights (same numbers, faster on CPU)")
    p.add_argument("--accuracy-inline", action="store_true", help="measure GSM8K accuracy with each evaluation instead of in a last phase")
    p.add_argument("--fp32-reference", action="store_true", help="also evaluate the unquantized model")
    p.add_argument("--check-loop", action="store_true", help="first compare train_adapter with qcorda.train for 3 steps")
    p.add_argument("--check-max-length", type=int, default=96)
    p.add_argument("--report-only", action="store_true", help="rebuild the markdown from the saved JSON")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "qcorda" / "study_forgetting"))
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "forgetting.md"))
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    from transformers import AutoTokenizer

    from qcorda.data import load_examples
    from qcorda.evaluate import load_for_eval
    from qcorda.prepare import load_prepared

    t0 = time.perf_counter()
    work = Path(args.work) / f"r{args.rank}"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw_path = out.with_suffix(".json")
    key = {k: getattr(args, k) for k in RESULT_KEYS}
    res = {"args": {k: v for k, v in vars(args).items()}, "key": key, "methods": {}, "seconds": 0.0}
    if raw_path.exists():  # resume: keep every (method, seed) measured with the same settings
        saved = json.loads(raw_path.read_text())
        if "trl_losses" in saved.get("check_loop", {}) and saved["check_loop"].get("lr") == args.lr:
            res["check_loop"] = saved["check_loop"]  # independent of the study's other settings
        if saved.get("key") == key:
            res["methods"] = saved.get("methods", {})
            res["seconds"] = saved.get("seconds", 0.0)
            for k in ("fp32", "check_loop", "runs"):
                if k in saved:
                    res[k] = saved[k]
    res.setdefault("runs", []).append({"argv": argv, "threads": torch.get_num_threads(), "start": time.strftime("%Y-%m-%d %H:%M:%S")})
    elapsed0 = res["seconds"]

    if args.report_only:
        write_report(out, res, args, [a for a in argv if a != "--report-only"], res["seconds"])
        print(out.read_text())
        return 0
    res["argv"] = argv

    def save():
        res["seconds"] = elapsed0 + time.perf_counter() - t0
        res["runs"][-1]["load"] = os.getloadavg()
        raw_path.write_text(json.dumps(res, indent=2))
        write_report(out, res, args, argv, res["seconds"])

    if args.check_loop and "check_loop" not in res:
        try:
            res["check_loop"] = check_loop(args, work)
        except Exception as e:  # the study does not depend on it
            res["check_loop"] = {"error": f"{type(e).__name__}: {e}"}
            print("check-loop failed:", res["check_loop"]["error"], flush=True)
        save()
    if args.fp32_reference and "fp32" not in res:
        print("== fp32 reference", flush=True)
        model, tok, _ = load_for_eval("gemma-3-270m")
        res["fp32"] = measure(model, tok, args)
        del model
        save()
    train = load_examples("gsm8k-train", ("question", "answer"), "alpaca", args.train_limit)
    # All inits first, then seed by seed over the methods: a run cut short still compares every method.
    prepared = {}
    for method in args.methods:
        prepared[method] = prepare_method(method, args, work)
        entry = res["methods"].setdefault(method, {"before": None, "after": {}})
        if entry["before"] is None:
            print(f"== {method} init", flush=True)
            model, tok, _ = load_for_eval(prepared[method])
            if args.dequantized_base:
                dequantize_base(model)
            entry["before"] = measure(model, tok, args, accuracy=args.accuracy_inline)
            del model
            save()
    for seed in args.seeds:
        for method in args.methods:
            entry = res["methods"][method]
            if str(seed) in entry["after"]:
                continue
            print(f"== {method} seed {seed}", flush=True)
            t = time.perf_counter()
            torch.manual_seed(seed)
            tok = AutoTokenizer.from_pretrained(str(prepared[method]))
            model = load_prepared(prepared[method], is_trainable=True)
            if args.dequantized_base:
                dequantize_base(model)
            losses = train_adapter(model, tok, train, args.steps, args.batch_size, args.lr, seed, args.max_length, args.max_grad_norm)
            train_s = time.perf_counter() - t
            model.save_pretrained(str(prepared[method] / f"trained_seed{seed}"))  # for the accuracy phase
            m = measure(model, tok, args, accuracy=args.accuracy_inline)
            m["train_loss"] = losses
            m["train_seconds"] = train_s
            m["eval_seconds"] = time.perf_counter() - t - train_s
            entry["after"][str(seed)] = m
            del model
            save()
    # GSM8K accuracy (greedy generation: the slow part) last, so that a short run still has every other number
    for seed in args.seeds[:1] + [None] + args.seeds[1:]:  # trained (first seed) before init: the more informative
        for method in args.methods:
            entry = res["methods"][method]
            m = entry["before"] if seed is None else entry["after"].get(str(seed))
            if m is None or m.get("gsm8k_acc") is not None:
                continue
            print(f"== accuracy {method} {'init' if seed is None else f'seed {seed}'}", flush=True)
            adapter = None if seed is None else prepared[method] / f"trained_seed{seed}"
            model, tok, _ = load_for_eval(prepared[method], adapter)
            if args.dequantized_base:
                dequantize_base(model)
            acc = gsm8k_accuracy(model, tok, args)
            print({"gsm8k_acc": acc["gsm8k_acc"], "gsm8k_loss (same as before)": acc["gsm8k_loss"], "was": m["gsm8k_loss"]}, flush=True)
            m.update({k: v for k, v in acc.items() if k != "gsm8k_loss"})
            del model
            save()
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
