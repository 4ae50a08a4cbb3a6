"""The CUDA defects of issue 24, shown on the CPU: the arguments that reach ``from_pretrained`` (device
map, dtype), how many models are alive at once, the QuantState's dtype, what bf16 support is asked,
the fp32 matmul precision the splits, calibration and compare's error figures run at (recorded at every product
by a TorchFunctionMode), and the generator the randomized SVD draws its sketch with. Each test failed on the code
that had the defect."""

import copy
import gc
import json
import weakref
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode

from export_helpers import inputs, prepared_and_trained
from qcorda.config import InitConfig, MergeConfig, ToLoraConfig, VerifyConfig
from qcorda.methods import names
from qcorda.testing import tiny

QUICK = VerifyConfig(samples=2, max_length=24)


class Loads:
    """Every ``AutoModelForCausalLM.from_pretrained`` call: its path and keyword arguments, and how many models
    an earlier call returned were still alive when it was made (the public seam every verb loads through)."""

    def __init__(self, monkeypatch):
        self.calls, self.alive_before, self._models = [], [], weakref.WeakSet()
        real = transformers.AutoModelForCausalLM.from_pretrained.__func__
        cls = transformers.AutoModelForCausalLM

        def spy(klass, path, *args, **kwargs):
            gc.collect()
            self.alive_before.append(len(self._models))
            self.calls.append((str(path), kwargs))
            model = real(klass, path, *args, **kwargs)
            self._models.add(model)
            return model

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A bf16 original, its prepared directory with bf16 compute, and a 'trained' adapter."""
    from qcorda.prepare import prepare
    from qcorda.prepared import load_prepared

    root = tmp_path_factory.mktemp("cuda")
    model = tiny.model("llama").to(torch.bfloat16)
    model.save_pretrained(root / "base")
    tiny.tokenizer().save_pretrained(root / "base")
    prep = prepare(root / "base", InitConfig(method="qpissa", rank=4, alpha=8.0, compute_dtype="bfloat16"), root / "prep",
                   progress=False).out
    trained = load_prepared(prep)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    trained.save_pretrained(root / "trained")
    return root / "base", prep, root / "trained"


# --------------------------------------------------------------------------- device maps


def test_cpu_loads_pass_an_explicit_device_map(setup, tmp_path, monkeypatch):
    """device_map=None is not the CPU: transformers' bitsandbytes quantizer maps the model to the current
    CUDA device. Every load of eval, merge's verification and to-lora's names the device."""
    from qcorda.evaluate import load_for_eval
    from qcorda.merge import merge
    from qcorda.prepared import load_prepared
    from qcorda.to_lora import to_lora

    base, prep, trained = setup
    loads = Loads(monkeypatch)
    load_prepared(prep, device="cpu")
    load_for_eval(base, device="cpu")
    merge(prep, tmp_path / "m", MergeConfig(dtype="bfloat16", device="cpu", verification=QUICK), adapter=trained, progress=False)
    to_lora(prep, str(base), tmp_path / "l", ToLoraConfig(dtype="bfloat16", device="cpu", verification=QUICK), adapter=trained,
            merged=tmp_path / "m", progress=False)
    assert len(loads.calls) == 7
    assert [kw.get("device_map") for _, kw in loads.calls] == [{"": "cpu"}] * 7


def test_bare_cuda_is_the_current_device(monkeypatch):
    """``cuda`` resolves to ``cuda:N`` of this process (what accelerate set), not to GPU 0's default."""
    from qcorda.prepared import device_map

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert device_map("cuda") == {"": "cuda:3"}
    assert device_map("cuda:1") == {"": "cuda:1"} and device_map("cpu") == {"": "cpu"}


@contextmanager
def _nothing():
    yield


@pytest.mark.parametrize("source", ["prepared", "init"])
def test_every_rank_loads_onto_its_own_device(source, setup, tmp_path, monkeypatch):
    """Under accelerate launch every rank loaded its model with ``{"": "cuda"}``, i.e. GPU 0. The trainer
    now creates accelerate's PartialState first and loads onto its device (here a faked rank on cuda:1)."""
    import accelerate
    import yaml

    import qcorda.train as qtrain
    from qcorda.recipe import load_recipe

    base, prep, _ = setup
    monkeypatch.setattr(accelerate, "PartialState", lambda cpu=False: SimpleNamespace(device=torch.device("cuda", 1),
                                                                                       main_process_first=_nothing))
    seen = []
    monkeypatch.setattr(qtrain, "load_prepared", lambda p, *a, **kw: seen.append(kw.get("device")) or SimpleNamespace())
    data = {"output_dir": str(tmp_path / "run"), "data": {"source": "gsm8k-train", "fields": ["question", "answer"], "limit": 8},
            "train": {"max_steps": 1}}
    if source == "prepared":
        data["prepared"] = str(prep)
    else:  # init: a directory already prepared with these settings is loaded, not prepared again
        data["model"] = str(base)
        data["init"] = {"method": "qpissa", "rank": 4, "alpha": 8.0, "compute_dtype": "bfloat16"}
        import shutil

        shutil.copytree(prep, tmp_path / "run" / "prepared")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    qtrain.prepared_model(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert seen == ["cuda:1"]


# --------------------------------------------------------------------------- memory: dtype, one model at a time


def test_eval_loads_a_plain_model_in_its_stored_dtype(setup):
    """eval upcast every plain model to fp32 (Llama-3-8B: 32 GB); it keeps the stored dtype unless asked."""
    from qcorda.evaluate import load_for_eval

    base, _, _ = setup
    model, _, kind = load_for_eval(base, device="cpu")
    assert kind == "hf" and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    upcast, _, _ = load_for_eval(base, device="cpu", dtype="float32")
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}


def test_merge_verification_holds_one_model_at_a_time(setup, tmp_path, monkeypatch):
    """merge's verification held the merged model and the 4-bit one together; now the second loads after
    the first is released, and the agreement is the same."""
    from qcorda.merge import merge

    _, prep, trained = setup
    loads = Loads(monkeypatch)
    res = merge(prep, tmp_path / "m", MergeConfig(dtype="bfloat16", device="cpu", verification=QUICK), adapter=trained, progress=False)
    assert len(loads.calls) == 2 and loads.alive_before == [0, 0]
    assert all(kw.get("dtype") != torch.float32 for _, kw in loads.calls)
    a = res.agreement[0]
    assert a.n_tokens > 0 and a.top1 > 0.9


def test_to_lora_never_holds_two_models(setup, tmp_path, monkeypatch):
    """to-lora loaded the fp32 base whole to convert, and kept it beside the merged and the 4-bit model to
    verify. It now reads the base's weights one target at a time (no model is loaded to convert), and its
    verification loads each of its three models, in its stored dtype, after the previous one is released."""
    from qcorda.to_lora import to_lora

    base, prep, trained = setup
    loads = Loads(monkeypatch)
    to_lora(prep, str(base), tmp_path / "quiet", ToLoraConfig(verify=False), adapter=trained, progress=False)
    assert loads.calls == []
    res = to_lora(prep, str(base), tmp_path / "l", ToLoraConfig(dtype="bfloat16", device="cpu", verification=QUICK),
                  adapter=trained, progress=False)
    assert len(loads.calls) == 3 and loads.alive_before == [0, 0, 0]
    assert all(kw.get("dtype") in (torch.bfloat16, "auto") for _, kw in loads.calls)
    assert {(a.reference, a.other) for a in res.agreement} == {
        ("trained 4-bit+adapter", "base+LoRA"), ("merged bfloat16", "base+LoRA"), ("trained 4-bit+adapter", "merged bfloat16")}


def test_logit_agreement_one_model_at_a_time_equals_side_by_side(tok):
    """Loading the models in turn (logits kept on the CPU) gives exactly the figures of models held together."""
    from qcorda.scoring import held_out_batches, logit_agreement

    models = {"a": tiny.model("llama", seed=0), "b": tiny.model("llama", seed=1), "c": tiny.model("llama", seed=2)}
    pairs = [("a", "c"), ("b", "c"), ("a", "b")]
    batches, _ = held_out_batches(tok, "gsm8k-test", ("question", "answer"), 4, 32, 2)
    batches = list(batches)
    together = logit_agreement(models, pairs, batches, progress=False)
    built = []
    loaders = {k: (lambda k=k: built.append(k) or tiny.model("llama", seed=int("abc".index(k)))) for k in models}
    in_turn = logit_agreement(loaders, pairs, batches, progress=False)
    assert built == ["a", "c", "b"] and in_turn == together and all(a.n_tokens > 0 for a in in_turn)


# --------------------------------------------------------------------------- the QuantState dtype


def test_quant_state_dequantizes_into_the_compute_dtype(setup, tok):
    """bitsandbytes dequantized into the QuantState's fp32 in every forward and backward, then cast to bf16.
    The loaded model's state now says bf16, the file keeps fp32, and logits and LoRA gradients are bit-identical."""
    from safetensors import safe_open

    from qcorda.prepared import load_prepared

    _, prep, trained = setup
    x = inputs(tok)

    def run(model):
        out = model(**x).logits
        out.float().pow(2).mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    model = load_prepared(prep, trained, is_trainable=True, device="cpu")
    import bitsandbytes as bnb

    states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(states) == 14 and {s.dtype for s in states} == {torch.bfloat16}
    y, g = run(model)
    model.zero_grad()
    for s in states:
        s.dtype = torch.float32  # what the file stores, and what the loaded model had before
    y32, g32 = run(model)
    assert torch.equal(y, y32) and g.keys() == g32.keys() and all(torch.equal(g[k], g32[k]) for k in g)
    with safe_open(str(prep / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("quant_state.bitsandbytes__nf4"))
        assert json.loads(bytes(f.get_tensor(key).tolist()))["dtype"] == "float32"


# --------------------------------------------------------------------------- bf16 support, TF32


def test_emulated_bf16_is_not_bf16_support(monkeypatch):
    """A V100 or T4 emulates bf16 (slowly); torch.cuda.is_bf16_supported() says True there unless asked
    with including_emulation=False. Neither the compute dtype nor the trainer's bf16 picks it."""
    from qcorda.models import resolve_compute_dtype
    from qcorda.train import use_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_compute_dtype("auto") == torch.float32
    assert use_bf16(SimpleNamespace(train=SimpleNamespace(bf16="auto"))) is False


@pytest.fixture
def tf32():
    """The environment asks for TF32 (set_float32_matmul_precision("high")); restored after the test."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("method,solver", [("qpissa", "full"), ("qpissa", "randomized"), ("loftq", "full")])
def test_splits_run_at_full_fp32_whatever_the_environment_says(tf32, monkeypatch, method, solver):
    from qcorda.decompose import decompose
    from qcorda.quantize import NF4

    seen = []
    for mod, name in ((torch.linalg, "svd"), (torch, "svd_lowrank")):
        real = getattr(mod, name)

        def spy(*a, _real=real, **k):
            seen.append(torch.get_float32_matmul_precision())
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, spy)
    W = torch.randn(96, 80, generator=torch.Generator().manual_seed(0))
    decompose(method, W, 4, 1.0, iters=2, quantizer=NF4, solver=solver)
    assert seen and set(seen) == {"highest"}
    assert torch.get_float32_matmul_precision() == "high"  # restored


def test_prepare_records_the_matmul_precision(tf32, tmp_path, tok):
    from qcorda.prepare import prepare

    out = prepare(tiny.save(tmp_path, "llama"), InitConfig(method="qpissa", rank=4), tmp_path / "p", tokenizer=tok, progress=False).out
    assert json.loads((out / "qcorda.json").read_text())["versions"]["float32_matmul_precision"] == "high"


class Precisions(TorchFunctionMode):
    """The fp32 matmul precision in force at every matrix product and factorization of fp32 tensors run inside
    it (``F.linear``, ``@``, ``addmm_``, Cholesky, triangular solves, SVD): on the CPU the precision changes no
    number, on an Ampere or later GPU ``high`` is TF32."""

    OPS = {torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.mm, torch.Tensor.mm, torch.addmm,
           torch.Tensor.addmm, torch.Tensor.addmm_, torch.bmm, torch.nn.functional.linear, torch.linalg.cholesky_ex,
           torch.linalg.cholesky, torch.cholesky_solve, torch.linalg.solve_triangular, torch.linalg.svd, torch.linalg.svdvals,
           torch.svd_lowrank}

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.OPS and any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args):
            self.seen.append((getattr(func, "__name__", str(func)), torch.get_float32_matmul_precision()))
        return func(*args, **(kwargs or {}))

    def at(self, precision: str) -> set[str]:
        """The ops that ran at ``precision``."""
        return {name for name, p in self.seen if p == precision}


@pytest.mark.parametrize("method", names(baseline=False))
def test_prepare_layer_runs_at_full_fp32_whatever_the_environment_says(tf32, method):
    """The split ran at full fp32 (decompose), but the rest of prepare_layer did not: the residual W − s·B·A
    whose NF4 codes are stored (qpissa, CorDA), the damping's Cholesky of C (every data-driven method) and the
    error figures multiplied at the environment's TF32. On a GPU the stored codes then differed from the CPU's."""
    from qcorda.covariance import Covariances
    from qcorda.layer import prepare_layer

    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(64, 48, generator=g), torch.randn(200, 48, generator=g)
    covs = Covariances({"l": X.T @ X / 200}, {"l": "l"}, 200)
    cfg = InitConfig(method=method, rank=4)
    with Precisions() as p:
        prepare_layer(W, cfg, "l", covs if cfg.needs_covariance else None)
    assert p.seen and p.at("high") == set()
    assert torch.get_float32_matmul_precision() == "high"  # restored


CALIB = dict(data="gsm8k-train", fields=("question", "answer"), samples=8, max_length=48, batch_size=4)


def test_calibration_runs_at_full_fp32_whatever_the_environment_says(tf32, tmp_path, tok):
    """The covariances C = XᵀX/n that CorDA, QERA and qcorda-cal split with were accumulated (``addmm_``) from
    activations the calibration forward computed, both at the environment's TF32 on a GPU: C then differed
    from the CPU's in the 4th digit before any split saw it. Both engines' calibration now runs at full fp32:
    the in-memory one (``collect``) and the streamed one (block by block from the checkpoint)."""
    from qcorda.calibration import collect_covariances
    from qcorda.config import CalibConfig
    from qcorda.prepare import prepare
    from qcorda.targets import find_targets

    cfg = InitConfig(method="qcorda-ipm", rank=4, calib=CalibConfig(**CALIB))
    model = tiny.model("llama")
    with Precisions() as p:
        collect_covariances(model, tok, find_targets(model, cfg.target_modules), cfg, progress=False)
    assert {"linear", "addmm_"} <= p.at("highest") and p.at("high") == set()
    with Precisions() as p:
        prepare(tiny.save(tmp_path, "llama"), cfg, tmp_path / "p", progress=False)  # the streamed engine
    assert {"linear", "addmm_"} <= p.at("highest") and p.at("high") == set()
    assert torch.get_float32_matmul_precision() == "high"  # restored


def test_compare_error_figures_run_at_full_fp32_whatever_the_environment_says(tf32, tok):
    """compare's error figures (tr(E·C_eval·Eᵀ), ‖E‖_*, W_eff = deq(Q) + s·B·A) were multiplied at the
    environment's TF32 on a GPU, so its act_err_rel differed from the CPU's golden figures in the 4th digit."""
    from qcorda.compare import compare
    from qcorda.config import CalibConfig, CompareConfig

    init = InitConfig(svd="full", calib=CalibConfig(**CALIB))
    cfg = CompareConfig(methods=("qlora", "qpissa", "qcorda-ipm"), ranks=(4,), init=init, eval_data=("gsm8k-test",),  # subset: NF4, SVD, calibrated
                        eval_samples=4, eval_max_length=32, eval_tokens=0)
    with Precisions() as p:
        compare(tiny.model("llama"), tok, cfg, progress=False)
    assert {"linalg_svdvals", "matmul"} <= p.at("highest") and p.at("high") == set()


# --------------------------------------------------------------------------- the randomized SVD's sketch


@pytest.mark.parametrize("shape", [(96, 80), (80, 96)])
def test_randomized_split_draws_its_sketch_on_the_cpu(shape, monkeypatch):
    """The default solver (svd: randomized) seeded the global RNG and let torch.svd_lowrank draw its Gaussian
    sketch with the generator of the weight's device: on a GPU that is CUDA's Philox, not the CPU's Mersenne
    twister, so one seed gave every GPU split another sketch than the CPU's, hence other factors and other
    stored codes (beyond rounding), and torch.manual_seed reseeded every GPU. The sketch is now drawn on the CPU
    by a generator of its own and moved to the weight's device; on the CPU the split is bit for bit what
    torch.svd_lowrank gave."""
    from qcorda.decompose import svd_top

    M = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        U0, S0, V0 = torch.svd_lowrank(M, q=4 + 16, niter=3)
    drawn = []
    real = torch.randn

    def spy(*a, **k):
        drawn.append(k.get("generator"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "randn", spy)
    state = torch.random.get_rng_state()
    U, S, Vt = svd_top(M, 4, "randomized", oversample=16, power_iters=3, seed=7)
    assert drawn and all(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in drawn)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not touched
    assert torch.equal(U, U0[:, :4]) and torch.equal(S, S0[:4]) and torch.equal(Vt, V0[:, :4].T)


def test_a_block_is_materialized_one_tensor_at_a_time():
    """The streamed engine's block walk gave a meta block storage (``to_empty``) and then built a full copy of the
    block's weights on the device before ``load_state_dict``: two fp32 copies of a block on the GPU at once (Llama-3-70B
    3.4 -> 6.9 GB). Now each tensor is copied into the block's own storage and released before the next is read."""
    from qcorda.blockwise import _materialize

    model = tiny.model("llama")
    block = model.model.layers[0]
    source = {k: v.detach().clone() for k, v in block.state_dict().items()}
    meta = copy.deepcopy(block).to("meta")
    alive: list = []

    def get(key):
        assert all(r() is None for r in alive), "an earlier tensor of the block is still held when the next is read"
        t = source[key.removeprefix("b.")].clone()
        alive.append(weakref.ref(t))
        return t

    _materialize(model, meta, "b.", get, torch.device("cpu"))
    for k, v in meta.state_dict().items():
        assert torch.equal(v, source[k]), k


def test_eva_runs_the_fp32_model_on_the_gpu_only_where_it_fits(monkeypatch):
    """qeva moved the whole fp32 original to the GPU for EVA's forwards and kept it there through every split (an 8B
    model: 32 GB on a 24 GB card). Now it goes to the GPU only when it fits, and back afterwards."""
    from qcorda import prepare as P

    model = tiny.model("llama")
    size = sum(p.numel() * 4 for p in model.parameters())
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(size / P.EVA_GPU_SHARE) + 1, 80 * 2**30))
    assert P.eva_device(model, cuda) == cuda
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (size, 80 * 2**30))
    assert P.eva_device(model, cuda) == torch.device("cpu")
    assert P.eva_device(model, torch.device("cpu")) == torch.device("cpu")


def test_eva_runs_at_full_fp32_whatever_the_environment_says(tf32, tok):
    """EVA's SVDs of the activations (PEFT's get_eva_state_dict) ran at the environment's TF32 on a GPU."""
    from qcorda.baselines import eva_components
    from qcorda.config import CalibConfig
    from qcorda.targets import find_targets

    model = tiny.model("llama")
    cfg = InitConfig(method="qeva", rank=4, calib=CalibConfig(data="gsm8k-train", fields=("question", "answer"), samples=8,
                                                             max_length=32))
    with Precisions() as seen:
        eva_components(model, tok, find_targets(model, ("all-linear",)), cfg, progress=False)
    assert seen.seen and not seen.at("high"), sorted(seen.at("high"))
