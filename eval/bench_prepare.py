"""Side-by-side benchmark of ``qcorda prepare`` against PEFT's documented CorDA workflow (issue 7).

One run measures, with the same samples, rank and targets:

1. **end to end** on Gemma-3-270M: qcorda's streamed ``prepare --method qcorda-ipm`` against
   PEFT's ``preprocess_corda`` + ``get_peft_model(init_lora_weights="corda")`` + ``unload`` +
   ``save_pretrained`` + reload in 4-bit: wall time and peak RSS, each side in its own
   subprocess (clean RSS);
2. **covariance throughput** (tokens/s): qcorda's shared, masked ``XᵀX`` hooks against
   ``preprocess_corda``'s hooks (timed inside the same two subprocesses);
3. **per-layer decomposition** for Llama-7B shapes: qcorda's CorDA-IPM and PiSSA splits (full and
   randomized SVD) against PEFT's CorDA eigen step (``collect_eigens_for_layer``) and its PiSSA
   init (``pissa`` and ``pissa_niter_4``), with the relative difference of the rank-r error;
4. **streamed prepare of a synthetic Llama-shaped checkpoint** written by this script
   (``--synthetic-params``, default 2.0e9): peak RSS against the size of the fp32 model.

Usage::

    python eval/bench_prepare.py                      # everything, writes eval/results/bench_prepare.md
    python eval/bench_prepare.py --skip synthetic --shapes 4096x4096
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss survives exec on Linux, so a child started by a
    process that once held more would report its parent's peak)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------- children


def _texts(args, tok):
    from qcorda.calibration import calibration_texts

    return _cfg(args), calibration_texts(_cfg(args), tok)


def _cfg(args):
    from qcorda.config import CalibConfig, InitConfig

    return InitConfig(method="qcorda-ipm", rank=args.rank, svd=args.svd, calib=CalibConfig(
        data="gsm8k-train", fields=("question", "answer"), samples=args.samples, max_length=args.max_length, batch_size=args.batch_size))


def child_qcorda(args) -> dict:
    """``stream_prepare`` + ``load_prepared``: from nothing loaded to a 4-bit model ready to train,
    as PEFT's side goes from nothing loaded to its reloaded 4-bit model."""
    import qcorda.blockwise as blockwise
    from qcorda.prepared import load_prepared
    from qcorda.stream import stream_prepare

    phase = {}
    real = blockwise.collect_blockwise

    def timed(*a, **k):  # the covariance phase: read embedding rows + every block, run them, accumulate
        t0 = time.perf_counter()
        covs = real(*a, **k)
        phase["cov_seconds"], phase["cov_tokens"] = time.perf_counter() - t0, covs.n_tokens
        phase["cov_peak_rss_mb"] = peak_rss_mb()
        return covs

    blockwise.collect_blockwise = timed
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        report = stream_prepare(args.model, _cfg(args), Path(d) / "out", progress=False)
        prepare_rss, prepare_s = peak_rss_mb(), time.perf_counter() - t0
        load_prepared(Path(d) / "out", device="cpu")
        wall = time.perf_counter() - t0
    return {"wall": wall, "rss_mb": peak_rss_mb(), "targets": len(report.targets), "load_seconds": wall - prepare_s,
            "prepare_seconds": prepare_s, "prepare_peak_rss_mb": prepare_rss,
            "decomp_seconds": sum(l.seconds for l in report.layers), **phase}


def child_peft(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import corda
    from peft.tuners.lora.config import CordaConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qcorda.models import resolve_model_path
    from qcorda.targets import find_targets

    path = resolve_model_path(args.model)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    _, texts = _texts(args, tok)
    targets = find_targets(model, ("all-linear",))
    n_tokens = 0

    @torch.no_grad()
    def run_model():  # PEFT's hook squeezes the batch dim: one sample per forward, as in its examples
        nonlocal n_tokens
        for t in texts:
            ids = tok(t, return_tensors="pt", truncation=True, max_length=args.max_length)
            n_tokens += int(ids["input_ids"].numel())
            model(**ids)

    phase = {}
    real_cov, real_eig = corda.calib_cov_distribution, corda.collect_eigens

    def cov(*a, **k):
        t = time.perf_counter()
        real_cov(*a, **k)
        phase["cov_seconds"] = time.perf_counter() - t

    def eig(*a, **k):
        t = time.perf_counter()
        real_eig(*a, **k)
        phase["decomp_seconds"] = time.perf_counter() - t

    corda.calib_cov_distribution, corda.collect_eigens = cov, eig
    lcfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets, init_lora_weights="corda",
                      corda_config=CordaConfig(corda_method="ipm"), lora_dropout=0.0, task_type="CAUSAL_LM")
    corda.preprocess_corda(model, lcfg, run_model=run_model)
    peft_model = get_peft_model(model, lcfg)
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        peft_model.save_pretrained(Path(d) / "adapter")
        base = peft_model.unload()
        base.save_pretrained(Path(d) / "residual")
        tok.save_pretrained(Path(d) / "residual")
        del base, peft_model, model
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        AutoModelForCausalLM.from_pretrained(Path(d) / "residual", quantization_config=q, dtype=torch.float32)
    wall = time.perf_counter() - t0
    return {"wall": wall, "rss_mb": peak_rss_mb(), "targets": len(targets), "cov_tokens": n_tokens, **phase}


def write_synthetic(root: Path, params: float, hidden: int) -> dict:
    """A Llama-shaped bf16 checkpoint of about ``params`` parameters in ``root/llama``, one shard per block
    (the writer never holds the model either), with Gemma's tokenizer files; returns its shape."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from qcorda.models import resolve_model_path

    h, inter, vocab = hidden, int(hidden * 2.7) // 256 * 256, 32000
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    layers = max(1, round((params - 2 * vocab * h) / per_layer))
    src = root / "llama"
    src.mkdir(parents=True)
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=h // 128,
                      num_key_value_heads=h // 128, vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(src)
    gemma = Path(resolve_model_path("gemma-3-270m"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gemma / f, src / f)
    g = torch.Generator().manual_seed(0)
    weight_map = {}

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    blocks = [lambda: {"model.embed_tokens.weight": rnd(vocab, h), "lm_head.weight": rnd(vocab, h),
                       "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        blocks.append(lambda p=p: {
            p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(h, h),
            p + "self_attn.v_proj.weight": rnd(h, h), p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
            p + "mlp.down_proj.weight": rnd(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
    for j, make in enumerate(blocks):
        sd = make()
        name = f"model-{j + 1:05d}-of-{len(blocks):05d}.safetensors"
        save_file(sd, str(src / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sd})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"params": layers * per_layer + 2 * vocab * h + h, "layers": layers, "hidden": h, "intermediate": inter}


def child_synthetic(args) -> dict:
    """Write a Llama-shaped bf16 checkpoint of ``--synthetic-params`` parameters, then stream-prepare it."""
    import shutil

    root = Path(tempfile.mkdtemp(dir=args.workdir, prefix="synthetic-"))
    try:
        t0 = time.perf_counter()
        shape = write_synthetic(root, args.synthetic_params, args.synthetic_hidden)
        src = root / "llama"
        write_s = time.perf_counter() - t0
        rss_after_write = peak_rss_mb()
        # the RSS of this process so far is the writer's; measure prepare in a fresh process
        res = {}
        if "synthetic-prepare" not in args.skip:
            out = subprocess.run([sys.executable, __file__, "--child", "synthetic-prepare", "--workdir", str(root),
                                  "--rank", str(args.rank)], capture_output=True, text=True, env=_env())
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            res = json.loads(out.stdout.strip().splitlines()[-1])
        out = subprocess.run([sys.executable, __file__, "--child", "synthetic-cov", "--workdir", str(root),
                              "--samples", str(args.samples), "--max-length", str(args.max_length),
                              "--batch-size", str(args.batch_size)], capture_output=True, text=True, env=_env())
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        res.update(json.loads(out.stdout.strip().splitlines()[-1]))
        disk = sum(f.stat().st_size for f in src.iterdir())
        return {**shape, "write_seconds": write_s, "writer_rss_mb": rss_after_write, "bf16_gb": disk / 1e9,
                "fp32_gb": shape["params"] * 4 / 1e9, **res}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def child_synthetic_prepare(args) -> dict:
    from qcorda.config import InitConfig
    from qcorda.stream import stream_prepare

    root = Path(args.workdir)
    cfg = InitConfig(method="qpissa", rank=args.rank, svd="randomized", compute_dtype="bfloat16")
    t0 = time.perf_counter()
    rep = stream_prepare(str(root / "llama"), cfg, root / "prepared", progress=False)
    wall = time.perf_counter() - t0
    out_gb = sum(f.stat().st_size for f in (root / "prepared").rglob("*") if f.is_file()) / 1e9
    return {"prepare_seconds": wall, "prepare_rss_mb": peak_rss_mb(), "targets": len(rep.targets), "out_gb": out_gb}


def child_synthetic_cov(args) -> dict:
    """Block-by-block covariance walk over the synthetic checkpoint (random token ids: its vocabulary is
    not a real tokenizer's), all-linear targets, in a fresh process."""
    import torch

    from qcorda.blockwise import collect_blockwise
    from qcorda.checkpoint import Checkpoint
    from qcorda.models import skeleton
    from qcorda.targets import find_targets

    path = Path(args.workdir) / "llama"
    t0 = time.perf_counter()
    config, skel = skeleton(path, trust_remote_code=False)
    ckpt = Checkpoint(path)
    targets = find_targets(skel, ("all-linear",))
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(0, args.samples, args.batch_size):
        n = min(args.batch_size, args.samples - i)
        batches.append({"input_ids": torch.randint(3, config.vocab_size, (n, args.max_length), generator=g),
                        "attention_mask": torch.ones(n, args.max_length, dtype=torch.long)})
    spill = Path(tempfile.mkdtemp(dir=args.workdir, prefix="spill-"))  # as stream_prepare spills them
    covs = collect_blockwise(skel, ckpt.get, batches, targets, progress=False, get_rows=ckpt.rows, spill=spill)
    walk_rss, walk_s = peak_rss_mb(), time.perf_counter() - t0
    covs.save(Path(args.workdir) / "covariance.safetensors")  # gathered into one file, one matrix at a time
    trace = sum(float(covs.matrices[g].diagonal().sum()) for g in covs.matrices)  # read back one at a time
    cov_gb = sum(f.stat().st_size for f in spill.iterdir()) / 1e9
    return {"cov_seconds": walk_s, "cov_rss_mb": walk_rss, "cov_tokens": covs.n_tokens, "cov_groups": len(covs.matrices),
            "cov_gb": cov_gb, "cov_all_rss_mb": peak_rss_mb(), "cov_trace": trace}


# --------------------------------------------------------------------------- decomposition


def synthetic_weight(out_f: int, in_f: int, seed: int):
    """A weight with a decaying spectrum (like trained LLM layers) plus a noise floor."""
    import torch

    g = torch.Generator().manual_seed(seed)
    k = 256
    decay = torch.arange(1, k + 1, dtype=torch.float32).pow(-0.7)
    W = (torch.randn(out_f, k, generator=g) * decay) @ torch.randn(k, in_f, generator=g) / k**0.5
    return W + 0.02 * torch.randn(out_f, in_f, generator=g) / in_f**0.5


def synthetic_cov(in_f: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(1024, in_f, generator=g) * torch.linspace(0.2, 3.0, in_f)  # anisotropic activations
    return X.T @ X / 1024


def bench_decompose(args, device: str = "cpu") -> list[dict]:
    """Per shape of ``args.shapes``, qcorda's splits against PEFT's at rank ``args.rank``. ``device``: where
    the weights, covariances and splits live (eval/gpu_check.py runs it on CUDA); timings synchronize it."""
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.corda import collect_eigens_for_layer

    from qcorda.decompose import corda_split, damp, low_rank_term, svd_split

    torch.manual_seed(0)
    r, rows = args.rank, []
    lcfg = LoraConfig(r=r, init_lora_weights="corda")
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        W, C = synthetic_weight(out_f, in_f, 0).to(device), synthetic_cov(in_f, 0).to(device)

        def timed(fn):  # GPU kernels run asynchronously: wait for them on both sides
            sync()
            t = time.perf_counter()
            v = fn()
            sync()
            return v, time.perf_counter() - t

        def corda_err(BA):  # the error CorDA minimizes: ‖(W − B·A)·C‖_F
            return ((W - BA) @ C).norm().item()

        # CorDA IPM
        lin = torch.nn.Linear(in_f, out_f, bias=False, device=device)
        lin.weight.data = W.clone()
        lin.covariance_matrix = C.clone()
        eig, t_peft = timed(lambda: collect_eigens_for_layer(lin, lcfg))
        peft_BA = (eig.U_WC[:, :r] * eig.S_WC[:r]) @ eig.V_WC[:, :r].T
        e_peft = corda_err(peft_BA)
        del eig, lin
        res = {}
        for solver in ("full", "randomized"):
            def run():
                d = damp(C, 0.01)
                return corda_split(W, d, r, 1.0, "top", solver=solver, oversample=16, power_iters=4, seed=0)
            split, t = timed(run)
            res[solver] = (t, corda_err(low_rank_term(split, 1.0)))
        rows.append({"shape": shape, "method": "CorDA-IPM", "peft": "collect_eigens_for_layer", "peft_s": t_peft, "peft_err": e_peft,
                     "full_s": res["full"][0], "full_err": res["full"][1], "rand_s": res["randomized"][0], "rand_err": res["randomized"][1]})
        # PiSSA
        from peft import get_peft_model

        def peft_pissa(init):
            m = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False, device=device))
            m[0].weight.data = W.clone()
            pm, dt = timed(lambda: get_peft_model(m, LoraConfig(r=r, lora_alpha=r, target_modules=["0"], init_lora_weights=init)))
            layer = pm.base_model.model[0]
            BA = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            return dt, (W - BA).norm().item()

        tp, ep = peft_pissa("pissa")
        tpn, epn = peft_pissa("pissa_niter_4")
        res = {}
        for solver in ("full", "randomized"):
            split, t = timed(lambda: svd_split(W, r, 1.0, "top", solver=solver, oversample=16, power_iters=4, seed=0))
            res[solver] = (t, (W - low_rank_term(split, 1.0)).norm().item())
        rows.append({"shape": shape, "method": "PiSSA", "peft": "pissa (full SVD)", "peft_s": tp, "peft_err": ep,
                     "full_s": res["full"][0], "full_err": res["full"][1], "rand_s": res["randomized"][0], "rand_err": res["randomized"][1],
                     "peft_niter_s": tpn, "peft_niter_err": epn})
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


DECOMPOSE_HEAD = ["shape (out×in)", "method", "PEFT step", "PEFT s", "qcorda full s", "qcorda rand s", "speedup full",
                  "speedup rand", "err diff rand %", "err diff full %"]


def decompose_table(drows: list[dict]) -> tuple[list[str], list[list]]:
    """``(head, rows)`` of :func:`bench_decompose`'s results: one row per PEFT step (PiSSA's ``pissa_niter_4``
    gets its own), with qcorda's speedup over it and its error relative to PEFT's in %."""
    rows = []
    for d in drows:
        steps = [(d["peft"], d["peft_s"], d["peft_err"])]
        if "peft_niter_s" in d:
            steps.append(("pissa_niter_4", d["peft_niter_s"], d["peft_niter_err"]))
        for step, peft_s, peft_err in steps:
            rows.append([d["shape"], d["method"], step, peft_s, d["full_s"], d["rand_s"], peft_s / d["full_s"], peft_s / d["rand_s"],
                         100 * (d["rand_err"] - peft_err) / peft_err, 100 * (d["full_err"] - peft_err) / peft_err])
    return DECOMPOSE_HEAD, rows


# --------------------------------------------------------------------------- parent


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def run_child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--skip", args.skip, "--model", args.model, "--samples", str(args.samples),
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--rank", str(args.rank),
           "--svd", args.svd, "--workdir", args.workdir, "--synthetic-params", str(args.synthetic_params),
           "--synthetic-hidden", str(args.synthetic_hidden)]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if out.returncode:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-4000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"[{kind}] {time.perf_counter() - t:.0f}s {res}", file=sys.stderr, flush=True)
    return res


def machine() -> str:
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, {cuda}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads); load average at start "
            f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")


def fmt(v, nd=3):
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--samples", type=int, default=32, help="calibration samples (gsm8k-train), both sides")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="qcorda's calibration batch (PEFT's hook needs batch 1)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--svd", default="randomized,full", help="qcorda's --svd for the end-to-end runs, comma separated")
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="out x in, comma separated")
    p.add_argument("--synthetic-params", type=float, default=2.0e9, help="size of the synthetic Llama checkpoint")
    p.add_argument("--synthetic-hidden", type=int, default=2560)
    p.add_argument("--skip", default="", help="comma list of e2e, decompose, synthetic, synthetic-prepare")
    p.add_argument("--workdir", default=None, help="where temporary checkpoints go (default: system temp)")
    p.add_argument("--out", default=str(REPO / "eval" / "results" / "bench_prepare.md"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workdir = args.workdir or tempfile.gettempdir()
    if args.child:
        fn = {"qcorda": child_qcorda, "peft": child_peft, "synthetic": child_synthetic,
              "synthetic-prepare": child_synthetic_prepare, "synthetic-cov": child_synthetic_cov}[args.child]
        print(json.dumps(fn(args)))
        return 0

    from qcorda.table import markdown_table, print_table

    skip = set(filter(None, args.skip.split(",")))
    lines = ["# qcorda prepare vs PEFT CorDA: benchmark", "",
             f"Machine: {machine()}.", "",
             f"Command: `python eval/bench_prepare.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines += [f"Run: {started}. All figures measured in this one run (nothing extrapolated: no CUDA here).", ""]

    if "e2e" not in skip:
        solvers = args.svd.split(",")
        qs = {}
        for solver in solvers:
            args.svd = solver
            qs[solver] = run_child("qcorda", args)
        pf = run_child("peft", args)
        q0 = qs[solvers[0]]

        for x in (*qs.values(), pf):
            x["tps"] = x["cov_tokens"] / x["cov_seconds"]

        def row(label, key, target=""):  # qcorda per solver, PEFT (where it has the figure), ratios
            vals = [q[key] for q in qs.values()]
            ref = pf.get(key)
            return [label, *vals, "" if ref is None else ref, *["" if ref is None else v / ref for v in vals], target]

        rows = [
            row("end-to-end wall time (s), to a loaded 4-bit model", "wall", "≤ 0.5"),
            row("end-to-end peak RSS (MB)", "rss_mb", "≤ 0.5"),
            row("covariance throughput (tokens/s)", "tps", "≥ 2"),
            row("covariance phase (s)", "cov_seconds"),
            row("decomposition + quantization, all targets (s)", "decomp_seconds"),
            row("prepare alone (s)", "prepare_seconds"),
            row("reload of the prepared directory (s)", "load_seconds"),
            row("peak RSS to the end of the covariance phase (MB)", "cov_peak_rss_mb"),
            row("peak RSS to the end of prepare, before reload (MB)", "prepare_peak_rss_mb"),
        ]
        head = ["figure", *[f"qcorda --svd {x}" for x in solvers], "PEFT", *[f"ratio ({x})" for x in solvers], "target"]
        title = (f"Gemma-3-270M, qcorda-ipm vs PEFT CorDA-IPM, r={args.rank}, {q0['targets']} targets (all-linear), "
                 f"{args.samples} gsm8k-train samples ≤ {args.max_length} tokens ({q0['cov_tokens']} tokens)")
        print_table(head, rows, title=title)
        lines += [f"## End to end: {title}", "",
                  "qcorda: streamed `prepare` (covariance walked one decoder block at a time from the safetensors "
                  f"file on the stored hidden states, batch {args.batch_size}; then layer by layer; the output written "
                  "tensor by tensor) and `load_prepared` of the result. PEFT: `preprocess_corda` (its hooks, one "
                  "sample per forward as its hook requires) + `get_peft_model(init_lora_weights='corda')` + save "
                  "adapter + `unload` + `save_pretrained` + reload with `BitsAndBytesConfig` (NF4, double quant). "
                  "Both sides are timed from nothing loaded (tokenizer and model loads included) to a 4-bit model "
                  "in memory. Each run is its own subprocess; peak RSS is that process's `VmHWM`. "
                  "`--svd randomized` is qcorda's randomized SVD for the top-r split (oversample 16, 4 power "
                  "iterations; its error against the full SVD is in the next table and tested); `--svd full` is the "
                  "exact SVD, qcorda's default.", "",
                  markdown_table(head, rows), ""]

    if "decompose" not in skip:
        head, rows = decompose_table(bench_decompose(args))
        title = f"Per-layer decomposition, Llama-7B shapes, r={args.rank}, CPU fp32"
        print_table(head, rows, title=title)
        lines += [f"## {title}", "",
                  "Synthetic weights with a decaying spectrum plus noise, anisotropic covariance from 1024 random "
                  "activations. CorDA error = ‖(W − s·B·A)·C‖_F, PiSSA error = ‖W − s·B·A‖_F; 'err diff' is qcorda's "
                  "error relative to PEFT's for the same rank (negative = qcorda better). qcorda's randomized SVD: "
                  "oversample 16, 4 power iterations. qcorda's CorDA timing includes damping + Cholesky; PEFT's "
                  "includes its damping loop with `linalg.inv`.", "",
                  markdown_table(head, rows), ""]

    if "synthetic" not in skip:
        s = run_child("synthetic", args)
        not_run = "not measured (--skip synthetic-prepare)"
        rows = [["parameters", f"{s['params'] / 1e9:.2f} B"], ["layers × hidden × intermediate", f"{s['layers']} × {s['hidden']} × {s['intermediate']}"],
                ["checkpoint on disk (bf16)", f"{s['bf16_gb']:.2f} GB"], ["the same model in fp32", f"{s['fp32_gb']:.2f} GB"],
                ["streamed prepare peak RSS", f"{s['prepare_rss_mb'] / 1024:.2f} GB" if "prepare_rss_mb" in s else not_run],
                ["peak RSS / fp32 model", f"{s['prepare_rss_mb'] / 1024 / (s['fp32_gb'] / 1.074):.3f}" if "prepare_rss_mb" in s else not_run],
                ["prepared output on disk", f"{s['out_gb']:.2f} GB" if "out_gb" in s else not_run],
                ["block-by-block covariance walk peak RSS (covariances spilled per block)", f"{s['cov_rss_mb'] / 1024:.2f} GB ({s['cov_tokens']} tokens, {s['cov_groups']} groups, {s['cov_seconds']:.0f} s)"],
                ["covariance walk peak RSS / fp32 model", f"{s['cov_rss_mb'] / 1024 / (s['fp32_gb'] / 1.074):.3f}"],
                ["the covariances on disk (fp32)", f"{s['cov_gb']:.2f} GB"],
                ["peak RSS after gathering them into one file and reading each back", f"{s['cov_all_rss_mb'] / 1024:.2f} GB"],
                ["prepare wall time", f"{s['prepare_seconds']:.0f} s ({s['targets']} targets)" if "prepare_seconds" in s else not_run]]
        title = "Streamed prepare of a synthetic Llama-shaped checkpoint (qpissa, randomized SVD, bf16 compute)"
        print_table(["figure", "value"], rows, title=title)
        lines += [f"## {title}", "",
                  f"Written by this script (`--synthetic-params {args.synthetic_params:g} --synthetic-hidden "
                  f"{args.synthetic_hidden}`), one safetensors shard per decoder block, then prepared in a fresh "
                  "process. Peak RSS is that process's `VmHWM`; it is bounded by one fp32 layer with its "
                  "decomposition and the output piece being written (the output is written tensor by tensor, "
                  "large tensors in 64 MB row blocks), not by the model.", "", markdown_table(["figure", "value"], rows), ""]

    lines += ["Timings were taken on a shared machine under load from other jobs; each ratio compares two "
              "figures measured in this same run, one after the other.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
