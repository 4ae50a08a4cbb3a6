"""Every model family through prepare → load → train → merge → to-lora, on tiny random models (issue 25).

    python -m eval.families [--families llama,opt] [--seeds 0,1] [--fresh]

For each family of :data:`qcorda.testing.families.FAMILIES` (tiny random models built from transformers'
config classes: hidden 64, 2 blocks, no hub), with the default targets (all-linear) and a target subset:

- prepare (streamed, from the saved checkpoint) by qlora, qpissa, qcorda-ipm, qcorda-cal and qera: ok, or
  the refusal;
- the load invariant (:func:`qcorda.testing.families.load_invariant`): the directory loaded by plain
  transformers + PEFT computes with deq(codes) + s·B·A (max |Δ| over every target and base layer);
- the NF4 fraction of the block weights' bytes (``qcorda.json``);
- 2 training steps of qcorda-cal (the adapter changes), merge to float32 (top-1 agreement and max |Δ logit|
  of the merged plain model against the trained 4-bit one) and to-lora exact-delta (PEFT loads it on the
  original base);
- the mean KL of the initialized 4-bit model to the fp32 original on 8 held-out GSM8K test records, relative
  to qlora's, for qcorda-cal and qera (per seed: the seed builds the random model and the inits).

For the mixture-of-experts families also: the NF4 fraction of the experts' bytes, how many experts' adapters
changed in training, the experts that got fewer calibration tokens than their inputs, and, apart
(:func:`expert_cost`), the seconds of the per-expert covariances and splits of one MoE layer against one dense
layer of the same total size.

Writes ``eval/results/families.{json,md}``; resumes from the json (a family done with the same key is skipped).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from eval.lib import Results, equal_fraction, machine, prepared_tensors
from qcorda.checkpoint import ADAPTER_PREFIX, Checkpoint
from qcorda.config import CalibConfig, ConfigError, InitConfig, MergeConfig, ToLoraConfig, VerifyConfig
from qcorda.covariance import Covariances
from qcorda.experts import is_expert
from qcorda.layer import prepare_layer
from qcorda.merge import merge
from qcorda.prepare import prepare
from qcorda.prepared import load_prepared
from qcorda.recipe import load_recipe
from qcorda.scoring import held_out_batches, logit_agreement
from qcorda.testing import families as F
from qcorda.testing import tiny
from qcorda.to_lora import to_lora
from qcorda.train import train

METHODS = ("qlora", "qpissa", "qcorda-ipm", "qcorda-cal", "qera")
CALIB = CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=16, max_length=64)
RANK = 4
KL_DATA = dict(source="gsm8k-test", fields=("question", "answer"), samples=8, max_length=96, batch_size=4)


def _cfg(method: str, targets: tuple[str, ...], seed: int) -> InitConfig:
    return InitConfig(method=method, rank=RANK, target_modules=targets, calib=CALIB, seed=seed)


def _short(e: Exception) -> str:
    s = str(e)
    return s if len(s) < 160 else s[:157] + "..."


def _kl(original, prepared: Path, batches) -> float:
    (a,) = logit_agreement({"fp32": original, "init": lambda: load_prepared(prepared, is_trainable=False)}, [("fp32", "init")],
                           batches, progress=False)
    return a.mean_kl


def _chain(prepared: Path, src: Path, work: Path) -> dict:
    """2 training steps, merge (verified), to-lora (loaded by PEFT on the original base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = {"output_dir": str(work / "run"), "prepared": str(prepared),
            "data": {"source": "gsm8k-train", "fields": ["question", "answer"], "limit": 8},
            "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 192, "learning_rate": 1e-2,
                      "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 2}}
    (work / "r.yaml").write_text(yaml.safe_dump(data))
    out: dict = {}
    try:
        t0 = time.perf_counter()
        r = train(load_recipe(work / "r.yaml"), progress=False)
        init, trained = Checkpoint(prepared / "adapter_init", "adapter_model"), Checkpoint(r.adapter, "adapter_model")
        changed = {k: not torch.equal(init.get(k), trained.get(k)) for k in init.keys()}
        experts = [k for k in changed if is_expert(k.split(".lora_")[0].removeprefix(ADAPTER_PREFIX))]
        out["train"] = {"ok": True, "loss": [r.first_loss, r.last_loss], "seconds": time.perf_counter() - t0,
                        "adapter_changed": any(changed.values()),
                        "expert_tensors": len(experts), "expert_tensors_changed": sum(changed[k] for k in experts)}
    except Exception as e:  # a failure is a result of this study, not a crash of it
        return {"train": {"ok": False, "error": _short(e)}}
    try:
        m = merge(prepared, work / "merged", MergeConfig(dtype="float32", verification=VerifyConfig(samples=4, max_length=96)),
                  adapter=r.adapter, progress=False)
        (a,) = m.agreement
        out["merge"] = {"ok": True, "top1": a.top1, "max_abs_diff": a.max_abs_diff}
    except Exception as e:
        out["merge"] = {"ok": False, "error": _short(e)}
    try:
        lora = to_lora(prepared, str(src), work / "lora", ToLoraConfig(mode="exact-delta", verify=False), adapter=r.adapter, progress=False).out
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(src)), str(lora))
        out["to_lora"] = {"ok": True}
    except Exception as e:
        out["to_lora"] = {"ok": False, "error": _short(e)}
    return out


def run_family(family: str, seeds: list[int], root: Path) -> dict:
    res: dict = {"family": family, "seeds": {}}
    tok = tiny.tokenizer()
    batches = list(held_out_batches(tok, KL_DATA["source"], KL_DATA["fields"], KL_DATA["samples"], KL_DATA["max_length"],
                                    KL_DATA["batch_size"])[0])
    for seed in seeds:
        src = F.save(root / f"s{seed}", family, seed)
        original = F.model(family, seed)
        row: dict = {"prepare": {}, "subset": {}}
        for method in METHODS:
            out = root / f"s{seed}" / f"{family}-{method}"
            t0 = time.perf_counter()
            try:
                layers = prepare(str(src), _cfg(method, ("all-linear",), seed), out, progress=False).report.layers
            except ConfigError as e:
                row["prepare"][method] = {"ok": False, "error": _short(e)}
                continue
            inv = F.load_invariant(out, original)
            manifest = json.loads((out / "qcorda.json").read_text())
            experts = manifest["storage"].get("experts")
            moe = {"experts_nf4": experts["nf4_fraction"], "expert_share": experts["bytes"] / manifest["storage"]["block_bytes"],
                   "expert_layers": sum(is_expert(t) for t in manifest["targets"]),
                   "few_tokens": sum(l.few_tokens for l in layers), "no_tokens": sum(l.tokens == 0 for l in layers)} if experts else {}
            row["prepare"][method] = {"ok": True, "seconds": time.perf_counter() - t0, **inv, **moe,
                                      "kl": _kl(original, out, batches) if method in ("qlora", "qcorda-cal", "qera") else None}
        if seed == seeds[0] and row["prepare"].get("qcorda-cal", {}).get("ok"):
            work = root / f"s{seed}" / "chain-all"
            work.mkdir(parents=True)
            row["chain"] = _chain(root / f"s{seed}" / f"{family}-qcorda-cal", src, work)
            sub = root / f"s{seed}" / f"{family}-subset"
            prepare(str(src), _cfg("qcorda-cal", F.SUBSET[family], seed), sub, progress=False)
            work = root / f"s{seed}" / "chain-subset"
            work.mkdir(parents=True)
            row["subset"] = {"targets": list(F.SUBSET[family]), **F.load_invariant(sub, original), **_chain(sub, src, work)}
        res["seeds"][str(seed)] = row
    return res


def _first(family_row: dict) -> dict:
    """The first seed's row of a family's results (the one that ran the chain)."""
    return next(iter(family_row["seeds"].values()))


def _mark(ok) -> str:
    return "ok" if ok else "FAIL"


def markdown(doc: dict) -> str:
    lines = [
        "# Every family end to end (issue 25)", "",
        f"`python -m eval.families --seeds {','.join(map(str, doc['key']['seeds']))}` on {doc.get('machine', '?')}. Tiny random models "
        "built from transformers' config classes (hidden 64, 2 blocks, vocabulary 384; no hub), rank 4, calibration on "
        f"{CALIB.samples} GSM8K train records ≤ {CALIB.max_length} tokens. Random weights: the KL figures show that each "
        "calibrated init starts closer to the fp32 model than qlora does on these shapes, not how much on a real model.", "",
        "Columns: prepare per method with the default targets (ok / refused); load: max |layer(x) − x·(deq(codes)+s·BA)ᵀ| "
        "over every target and base layer, the directory loaded by plain transformers + PEFT; NF4: fraction of the block "
        "weights' bytes stored in NF4; train / merge / to-lora: qcorda-cal, 2 steps, merged float32 (top-1 agreement with "
        "the trained 4-bit model), exact-delta loaded by PEFT on the original base; subset: the same chain with "
        "the subset targets (the other block Linears stored as NF4(W)); KL ratio: mean KL(fp32 ‖ init) / qlora's "
        "(mean over seeds, min–max in brackets).", "",
        "| family | qlora | qpissa | qcorda-ipm | qcorda-cal | qera | load max abs Δ | NF4 | train | merge top-1 | to-lora | subset (targets: train, merge, to-lora) | KL qcorda-cal / qlora | KL qera / qlora |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family in doc["key"]["families"]:
        r = doc["families"].get(family)
        if r is None:
            lines.append(f"| {family} | not run |" + " |" * 13)
            continue
        seeds = list(r["seeds"].values())
        first = _first(r)
        prep = first["prepare"]
        cells = [_mark(prep[m]["ok"]) if prep[m]["ok"] else "refused" for m in METHODS]
        oks = [p for p in prep.values() if p["ok"]]
        load = f"{max(p['max_abs_diff'] for p in oks):.1e}" if oks else "–"
        nf4 = f"{min(p['nf4_fraction'] for p in oks):.0%}" if oks else "–"
        ch = first.get("chain", {})
        tr = ch.get("train", {})
        train_c = ("ok" if tr.get("adapter_changed") else "no change") if tr.get("ok") else ("FAIL" if tr else "–")
        mg = ch.get("merge", {})
        merge_c = f"{mg['top1']:.3f}" if mg.get("ok") else ("FAIL" if mg else "–")
        tl = ch.get("to_lora", {})
        lora_c = "ok" if tl.get("ok") else ("FAIL" if tl else "–")
        sub = first.get("subset", {})
        if sub:
            s_tr, s_mg, s_tl = sub.get("train", {}), sub.get("merge", {}), sub.get("to_lora", {})
            sub_c = (f"{','.join(sub['targets'])}: {'ok' if s_tr.get('adapter_changed') else 'FAIL'}, "
                     f"{s_mg['top1']:.3f}" if s_mg.get("ok") else "FAIL") + f", {'ok' if s_tl.get('ok') else 'FAIL'}"
        else:
            sub_c = "–"
        kls = []
        for m in ("qcorda-cal", "qera"):
            ratios = [s["prepare"][m]["kl"] / s["prepare"]["qlora"]["kl"] for s in seeds
                      if s["prepare"].get(m, {}).get("ok") and s["prepare"]["qlora"].get("kl")]
            kls.append(f"{sum(ratios) / len(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}]" if ratios else "–")
        lines.append(f"| {family} | " + " | ".join(cells + [load, nf4, train_c, merge_c, lora_c, sub_c] + kls) + " |")
    moe = [f for f in doc["key"]["families"] if f in F.MOE and f in doc["families"]
           and _first(doc["families"][f])["prepare"].get("qcorda-cal", {}).get("ok")]
    if moe:
        lines += ["", "## Mixture of experts", "",
                  "Every expert is its own layer (`qcorda.experts`: the fused 3-D expert parameters split into per-expert "
                  "Linear layers, the same forward), decomposed in fp32 by the method, its residual stored NF4 + double "
                  "quantization (blocksize 64), its adapter initialized (qcorda-cal) from the covariance of the calibration "
                  "tokens its router sends it. Columns (qcorda-cal, seed 0): expert layers with an adapter; the experts' share "
                  "of the block bytes and the NF4 fraction of the experts' bytes; expert layers that got fewer routed "
                  "calibration tokens than their inputs (the damping rule decides their covariance) and none (C = I); expert "
                  "adapter tensors changed by 2 training steps; the merged float32 model's top-1 agreement with the trained "
                  "4-bit model (plain transformers loads it from per-expert tensors under the checkpoint's own names); "
                  "to-lora: exact-delta, experts as PEFT `target_parameters`, loaded by PEFT on the original base.", "",
                  "| family | expert layers | experts' share of block bytes | experts in NF4 | few tokens / none | expert adapters changed | merge top-1 | to-lora |",
                  "|---|---|---|---|---|---|---|---|"]
        for f in moe:
            first = _first(doc["families"][f])
            p, ch = first["prepare"]["qcorda-cal"], first.get("chain", {})
            tr, mg, tl = ch.get("train", {}), ch.get("merge", {}), ch.get("to_lora", {})
            lines.append(f"| {f} | {p['expert_layers']} | {p['expert_share']:.0%} | {p['experts_nf4']:.0%} | "
                         f"{p['few_tokens']} / {p['no_tokens']} | {tr.get('expert_tensors_changed', '–')} of {tr.get('expert_tensors', '–')} | "
                         f"{mg['top1']:.3f} | {'ok' if tl.get('ok') else 'FAIL'} |" if mg.get("ok") else f"| {f} | FAIL |")
    cost = doc.get("expert_cost")
    if cost:
        lines += ["", "### Cost of per-expert covariances and splits", "",
                  f"`python -m eval.families` (`expert_cost`): one MoE projection of {cost['experts']} experts of "
                  f"({cost['inter']}, {cost['hidden']}), top-{cost['top_k']} routing of {cost['tokens']} tokens, against one "
                  f"dense layer of the same total size ({cost['experts'] * cost['inter']}, {cost['hidden']}) seeing every token; "
                  f"rank {cost['rank']}, fp32, {cost['threads']} thread(s), best of {cost['repeats']}. Covariance: the experts' "
                  "X_eᵀX_e over their routed tokens (k·T token rows in all) against one XᵀX over T.", "",
                  "| part | experts (s) | dense (s) | experts / dense |", "|---|---|---|---|"]
        for part, (e, d) in cost["seconds"].items():
            lines.append(f"| {part} | {e:.3f} | {d:.3f} | {e / d:.2f} |")
    refusals = {f: next((p["error"] for p in _first(r)["prepare"].values() if not p["ok"]), None)
                for f, r in doc["families"].items()}
    lines += ["", "Refusals (the message prepare prints):", ""]
    lines += [f"- **{f}**: {e}" for f, e in refusals.items() if e]
    lines += ["", f"Wall time: {doc.get('seconds', 0):.0f} s."]
    return "\n".join(lines)


#: The families the GPU check runs (:func:`on_device`): a Llama, GPT-2's Conv1D layers, and every mixture of experts.
ON_DEVICE = ("llama", "gpt2", *F.MOE)
#: An error figure (error / qlora's) on the device against the CPU's, same weights and covariance file.
DEVICE_TOLERANCE = 5e-3


def on_device(family: str, device: str, root: Path) -> dict:
    """One tiny family on ``device`` against the CPU (the GPU check's ``families`` part): qlora prepared on both, its
    NF4 codes compared byte for byte (experts included); qcorda-cal prepared on both from one covariance file collected
    on ``device`` (the experts' routed tokens with it), its error figure and the experts' token counts compared; the
    device's directory through the load invariant (:func:`qcorda.testing.families.load_invariant`); then its 2 training
    steps, merge (verified) and to-lora on ``device`` (:func:`_chain`). Returns the figures and ``checks``: ``(what,
    value, target, passed)``."""
    src = F.save(root / "src", family, 0)
    original = F.model(family, 0)
    cov = root / "covariance.safetensors"
    out: dict = {"family": family, "checks": []}

    def run(method: str, dev: str, tag: str):
        d = root / f"{method}-{tag}"
        # fp32 compute: a random tiny model's logits are nearly flat, so bf16 would make the merged model's top-1
        # agreement a coin toss; the bf16 paths are the Gemma parts' to check
        cfg = InitConfig(method=method, rank=RANK, calib=CALIB, device=dev, compute_dtype="float32")
        data = cfg.needs_covariance
        return d, prepare(str(src), cfg, d, progress=False, calib=cov if data and cov.exists() else None,
                          save_covariance=cov if data and not cov.exists() else None).report

    (q_dev, _), (q_cpu, _) = run("qlora", device, "device"), run("qlora", "cpu", "cpu")
    a, b = prepared_tensors(q_dev), prepared_tensors(q_cpu)
    equal, _ = equal_fraction(a, b, [k for k in a if k in b and (not a[k].is_floating_point() or "absmax" in k)])
    out["checks"].append(("qlora: NF4 codes and absmax, device vs CPU", equal, "byte-equal (1.0)", equal == 1.0 and a.keys() == b.keys()))
    (c_dev, r_dev), (_, r_cpu) = run("qcorda-cal", device, "device"), run("qcorda-cal", "cpu", "cpu")
    rel = {"device": r_dev.err / r_dev.qlora_err, "cpu": r_cpu.err / r_cpu.qlora_err}
    out["weight_err_rel"] = rel
    out["checks"].append(("qcorda-cal: error figure, device vs CPU", rel["device"] - rel["cpu"], f"within ±{DEVICE_TOLERANCE}",
                          abs(rel["device"] - rel["cpu"]) <= DEVICE_TOLERANCE))
    tokens = [[l.tokens for l in r.layers] for r in (r_dev, r_cpu)]
    if any(t is not None for t in tokens[0]):
        out["checks"].append(("qcorda-cal: experts' routed calibration tokens, device vs CPU", tokens[0] == tokens[1], "equal",
                              tokens[0] == tokens[1]))
    inv = F.load_invariant(c_dev, original)
    out["load_invariant"] = inv
    out["checks"].append(("device's directory: loaded layer = deq(codes) + s·B·A", inv["max_abs_diff"], "< 1e-4",
                          inv["max_abs_diff"] < 1e-4))
    work = root / "chain"
    work.mkdir()
    chain = _chain(c_dev, src, work)
    out["chain"] = chain
    for step in ("train", "merge", "to_lora"):
        ok = chain.get(step, {}).get("ok", False)
        out["checks"].append((f"{step} on {device}", chain.get(step, {}).get("error", "ok"), "no error", ok))
    if chain.get("train", {}).get("ok") and chain["train"]["expert_tensors"]:
        t = chain["train"]
        out["checks"].append(("every expert adapter changes in training", f"{t['expert_tensors_changed']}/{t['expert_tensors']}",
                              "all", t["expert_tensors_changed"] == t["expert_tensors"]))
    if chain.get("merge", {}).get("ok"):
        out["checks"].append(("merged vs trained 4-bit, top-1", chain["merge"]["top1"], ">= 0.99", chain["merge"]["top1"] >= 0.99))
    return out


def expert_cost(hidden: int = 512, inter: int = 256, experts: int = 8, top_k: int = 2, tokens: int = 4096, rank: int = 16,
                repeats: int = 3) -> dict:
    """Seconds of the per-expert covariances and splits of one MoE projection (E experts ``(I, H)``, each seeing its
    routed tokens) against one dense layer ``(E·I, H)`` seeing every token: the covariance accumulation and the
    qcorda-ipm / qcorda-cal split + NF4 quantization (:func:`qcorda.layer.prepare_layer`), best of ``repeats``."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(tokens, hidden, generator=g)
    route = torch.rand(tokens, experts, generator=g).topk(top_k, dim=1).indices  # uniform top-k routing
    Ws = [torch.randn(inter, hidden, generator=g) / hidden**0.5 for _ in range(experts)]
    W = torch.cat(Ws)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def cov_experts():
        return [Xe.T @ Xe / tokens for Xe in (X[(route == e).any(1)] for e in range(experts))]  # each routed set once

    seconds = {"covariance": (best(cov_experts), best(lambda: X.T @ X / tokens))}
    Cs = cov_experts()
    covs = Covariances({**{f"e{e}": C for e, C in enumerate(Cs)}, "dense": X.T @ X / tokens},
                       {**{f"e{e}": f"e{e}" for e in range(experts)}, "dense": "dense"}, tokens)
    for method in ("qcorda-ipm", "qcorda-cal"):
        cfg = InitConfig(method=method, rank=rank, calib=CALIB)
        seconds[f"{method} split + NF4"] = (best(lambda: [prepare_layer(Ws[e], cfg, f"e{e}", covs) for e in range(experts)]),
                                            best(lambda: prepare_layer(W, cfg, "dense", covs)))
    return {"hidden": hidden, "inter": inter, "experts": experts, "top_k": top_k, "tokens": tokens, "rank": rank,
            "repeats": repeats, "threads": torch.get_num_threads(), "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(F.FAMILIES))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--fresh", action="store_true", help="ignore saved results")
    args = ap.parse_args(argv)
    families, seeds = args.families.split(","), [int(s) for s in args.seeds.split(",")]
    store = Results("families", {"families": families, "seeds": seeds, "rank": RANK, "calib_samples": CALIB.samples})
    doc = {"key": store.key} if args.fresh else store.load()
    doc.setdefault("families", {})
    doc["machine"] = machine()
    t0 = time.perf_counter() - doc.get("seconds", 0)
    for family in families:
        if family in doc["families"]:
            continue
        print(f"[families] {family}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            doc["families"][family] = run_family(family, seeds, Path(tmp))
        doc["seconds"] = time.perf_counter() - t0
        store.save(doc, markdown(doc))
    if "expert_cost" not in doc and any(f in F.MOE for f in families):
        print("[families] expert_cost", flush=True)
        doc["expert_cost"] = expert_cost()
    store.save(doc, markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
