"""Every recipe shipped under qcorda/recipes/ loads into the config dataclasses and fits the GPU it is
sized for, and ships in the wheel; names resolve wherever a recipe is accepted (``qcorda recipes``,
``copy``, ``train``, ``plan``); ``qcorda plan`` unit tests (NF4 storage == bitsandbytes, config.json
checks, CLI)."""

import json
from pathlib import Path

import pytest
import torch

from qcorda.config import ConfigError
from qcorda.methods import NAMES as METHOD_NAMES
from qcorda.plan import (
    GB, PROJECTIONS, PlanInput, adam_state_bytes, check_arch, nf4_bytes, plan_input, plan_memory, plan_recipe,
    read_model_config, target_projections,
)
from qcorda.recipe import RECIPES_DIR, ArchConfig, load_recipe, resolve_recipe, shipped
from qcorda.table import fmt

ROOT = Path(__file__).resolve().parent.parent
#: every training recipe (accelerate configs under qcorda/recipes/accelerate/ are not recipes), by name
NAMES = list(shipped())
RECIPES = [shipped()[n] for n in NAMES]


def test_recipes_found():
    assert len(RECIPES) >= 7


@pytest.mark.parametrize("name", NAMES)
def test_recipe_loads_and_fits(name):
    path = RECIPES_DIR / f"{name}.yaml"
    recipe = load_recipe(name)
    assert recipe == load_recipe(path)
    text = path.read_text()
    assert f"qcorda train {name}\n" in text, "header shows the launch command, by name"
    assert recipe.output_dir and recipe.arch is not None and recipe.init is not None
    res = plan_recipe(recipe, "cuda", check=True)  # check=True: arch vs config.json where it is readable
    if recipe.gpu_memory_gb is not None:
        assert res.plan.fits(recipe.gpu_memory_gb), f"{path} plans {res.plan.total / GB:.2f} GB > {recipe.gpu_memory_gb} GB"
        # the header quotes the planner's figure for exactly this recipe
        assert f"qcorda plan: {fmt(round(res.plan.total / GB, 3))} GB planned" in text
    if path.parent != RECIPES_DIR:  # qcorda/recipes/<model>/<method>-<task>.yaml
        assert path.stem.split("-")[0] in {m.split("-")[0] for m in METHOD_NAMES}
        assert path.stem.startswith(recipe.init.method)


@pytest.mark.parametrize("path", RECIPES, ids=NAMES)
def test_recipe_learning_rate_is_auto_or_explained(path):
    """Issue 15: the SVD inits diverged at QLoRA's learning rate; a recipe trains at its method's rate
    (learning_rate: auto) or says why not."""
    import warnings

    from qcorda.train import learning_rate

    recipe = load_recipe(path)
    if recipe.train.learning_rate != "auto":
        assert "explicit learning rate:" in path.read_text(), f"{path}: say why the learning rate is not auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never more than 3x the method's recommended rate
        learning_rate(recipe)


def test_hub_recipes_cover_the_issue():
    recipes = [load_recipe(p) for p in RECIPES]
    by_gpu = {r.gpu_memory_gb for r in recipes}
    assert {24, 48} <= by_gpu
    models = {r.model for r in recipes}
    for m in ("meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B", "mistralai/Mistral-7B-v0.1", "Qwen/Qwen2.5-7B",
              "google/gemma-2-9b", "meta-llama/Meta-Llama-3-70B"):
        assert m in models
    for r in recipes:
        if r.arch.experts:  # a mixture of experts: every expert has its own adapter, so a smaller rank each
            assert 8 <= r.init.rank <= 32
        elif r.gpu_memory_gb == 24:
            assert r.init.rank in (64, 128)
        elif r.gpu_memory_gb == 48:
            assert 16 <= r.init.rank <= 64
    assert {"Qwen/Qwen3-30B-A3B", "openai/gpt-oss-20b"} <= models  # the mixtures of experts users bring
    assert any(r.init.method == "qcorda-kpm" and r.init.calib.data == "nq-open" for r in recipes)


# --------------------------------------------------------------------------- planner units


@pytest.mark.parametrize("shape", [(64, 64), (3, 100), (640, 2048), (256, 16385)])
def test_nf4_bytes_match_bitsandbytes(shape):
    from qcorda.quantize import quantize_nf4

    q = quantize_nf4(torch.randn(*shape))
    s = q.quant_state
    stored = sum(t.numel() * t.element_size() for t in (q.packed, s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code))
    packed, constants = nf4_bytes(shape[0] * shape[1])
    assert packed == q.packed.numel() * q.packed.element_size()
    assert packed + constants == stored


def test_adam8bit_state_matches_bitsandbytes():
    import bitsandbytes as bnb

    for numel in (4095, 4096, 70000):
        p = torch.nn.Parameter(torch.randn(numel))
        opt = bnb.optim.AdamW8bit([p])
        p.grad = torch.randn_like(p)
        opt.step()
        state = opt.state[p]
        # qmap1/qmap2 are the optimizer's shared 256-entry code tables (one pair for all parameters)
        assert state["qmap1"] is opt.name2qmap["dynamic"] if numel >= 4096 else "qmap1" not in state
        stored = sum(v.numel() * v.element_size() for k, v in state.items()
                     if torch.is_tensor(v) and k != "step" and not k.startswith("qmap") and v.numel() > 1)
        assert adam_state_bytes(numel, "paged_adamw_8bit") == stored
    assert adam_state_bytes(1000, "paged_adamw_32bit") == 8000


def _arch(**kw):
    base = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=384, tied_embeddings=False)
    return ArchConfig(**{**base, **kw})


def test_plan_terms_follow_their_formulas():
    arch = _arch()
    p = plan_memory(PlanInput(arch, 4, PROJECTIONS, 2, 32, "paged_adamw_32bit", 4, device="cpu"))
    quantized = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)  # q, o; k, v (2 kv heads x 16); gate, up, down
    assert p.quantized_params == quantized and p.nf4_weights == quantized // 2
    assert p.trainable_params == 2 * 4 * (128 + 96 * 2 + 128 + 192 * 3)
    assert p.adapter == p.adapter_grads == 4 * p.trainable_params and p.optimizer == 8 * p.trainable_params
    assert p.cuda_context == 0
    # untied: embedding and lm_head; tied: once
    tied = plan_memory(PlanInput(_arch(tied_embeddings=True), 4, PROJECTIONS, 2, 32, "paged_adamw_32bit", 4, device="cpu"))
    assert p.unquantized - tied.unquantized == 384 * 64 * 4
    # fewer targets: the rest is NF4(W) without an adapter (the whole base is 4-bit); kept projections stay in the compute dtype
    attn = plan_memory(PlanInput(arch, 4, ("q_proj", "v_proj"), 2, 32, "paged_adamw_32bit", 4, device="cpu"))
    assert attn.nf4_weights == p.nf4_weights and attn.unquantized == p.unquantized and attn.trainable_params < p.trainable_params
    kept = plan_memory(PlanInput(arch, 4, ("q_proj", "v_proj"), 2, 32, "paged_adamw_32bit", 4, device="cpu", kept=("o_proj",)))
    assert kept.unquantized - p.unquantized == 2 * 64 * 64 * 4 and p.nf4_weights - kept.nf4_weights == 2 * 64 * 64 // 2
    # activations grow with batch x sequence; the static terms do not
    big = plan_memory(PlanInput(arch, 4, PROJECTIONS, 4, 64, "paged_adamw_32bit", 4, device="cpu"))
    assert big.static == p.static and big.activations > 3 * p.activations
    eight = plan_memory(PlanInput(arch, 64, PROJECTIONS, 2, 32, "paged_adamw_8bit", 4, device="cpu"))
    thirty2 = plan_memory(PlanInput(arch, 64, PROJECTIONS, 2, 32, "paged_adamw_32bit", 4, device="cpu"))
    assert eight.optimizer < thirty2.optimizer / 3


def test_target_patterns_use_prepare_matching():
    assert target_projections(("all-linear",)) == PROJECTIONS
    assert target_projections(("q_proj", "v_proj")) == ("q_proj", "v_proj")
    assert target_projections(("*.mlp.*",)) == ("gate_proj", "up_proj", "down_proj")
    with pytest.raises(ConfigError, match="target_modules"):
        target_projections(("c_attn",))


def _recipe_file(tmp_path, model, **arch):
    import yaml

    a = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=384, tied_embeddings=False, **arch)
    data = {"output_dir": str(tmp_path / "run"), "model": str(model), "init": {"method": "qpissa", "rank": 4}, "arch": a}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_json_mismatch_names_the_recipe_key(tmp_path):
    from qcorda.testing import tiny

    model = tiny.save(tmp_path, "llama")
    cfg = json.loads((model / "config.json").read_text())
    ok = load_recipe(_recipe_file(tmp_path, model, head_dim=16))
    assert plan_recipe(ok).checked_against.endswith("config.json")
    bad = load_recipe(_recipe_file(tmp_path, model, head_dim=16), ["arch.intermediate=256"])
    with pytest.raises(ConfigError, match=r"arch\.intermediate = 256 .*intermediate_size = 128"):
        plan_recipe(bad)
    bad = load_recipe(_recipe_file(tmp_path, model), ["arch.tied_embeddings=true"])
    with pytest.raises(ConfigError, match=r"arch\.tied_embeddings"):
        plan_recipe(bad)
    assert read_model_config(str(tmp_path / "nowhere")) is None
    assert read_model_config("some-org/not-in-the-cache") is None
    # unreadable config.json: planned offline, nothing checked
    off = load_recipe(_recipe_file(tmp_path, "some-org/not-in-the-cache"))
    assert plan_recipe(off).checked_against is None
    # the planner checks the key/value heads (GQA) against config.json too, naming both numbers
    assert cfg["num_key_value_heads"] == 2
    bad = load_recipe(_recipe_file(tmp_path, model, head_dim=16), ["arch.kv_heads=4"])
    with pytest.raises(ConfigError, match=r"arch\.kv_heads = 4 but .*num_key_value_heads = 2; set arch\.kv_heads: 2"):
        plan_recipe(bad)


def test_check_arch_reads_text_config_and_defaults():
    arch = _arch()
    check_arch(arch, {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "vocab_size": 384, "tie_word_embeddings": False})
    with pytest.raises(ConfigError, match=r"arch\.kv_heads"):  # no num_key_value_heads: MHA, kv = heads
        check_arch(arch, {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                          "vocab_size": 384, "tie_word_embeddings": False})


def test_plan_cli(tmp_path, capsys):
    from qcorda.cli import main

    assert main(["plan", str(RECIPES_DIR / "llama3-8b/qcorda-ipm-metamath.yaml")]) == 0
    out = capsys.readouterr().out
    assert "| total" in out and "24 GB GPU: fits" in out and "48 GB GPU: fits" in out
    assert main(["plan", "llama3-8b/qcorda-ipm-metamath"]) == 0  # by name: the same plan
    assert capsys.readouterr().out.replace("plan llama3-8b/", "plan X/") == out.replace(f"plan {RECIPES_DIR}/llama3-8b/qcorda-ipm-metamath.yaml", "plan X/qcorda-ipm-metamath")
    assert main(["plan", "llama3-70b/qcorda-ipm-metamath"]) == 0
    assert "24 GB GPU: does NOT fit" in capsys.readouterr().out
    assert main(["plan", "llama3-8b/qcorda-ipm-metamath", "arch=null"]) == 2
    assert "arch:" in capsys.readouterr().err


def test_plan_input_cpu_defaults():
    recipe = load_recipe("gemma3-270m-cpu")
    cpu, gpu = plan_input(recipe, "cpu"), plan_input(recipe, "cuda")
    assert cpu.compute_bytes == 4 and gpu.compute_bytes == 2
    assert plan_memory(cpu).cuda_context == 0 < plan_memory(gpu).cuda_context


# --------------------------------------------------------------------------- shipped recipes: names, list, copy, wheel


def test_package_data_ships_every_recipe():
    """pyproject's package-data globs match every file under qcorda/recipes/ (a recipe one folder deeper
    would be left out of the wheel silently)."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["qcorda"]
    pkg = RECIPES_DIR.parent
    files = [p.relative_to(pkg).as_posix() for p in RECIPES_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert "recipes/accelerate/fsdp_qlora.yaml" in files and len(files) == len(shipped(configs=True))
    # setuptools' * does not cross a folder (glob semantics); fnmatch's does, so compare by depth too
    shipped_files = [f for f in files if any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert shipped_files == files


def test_names_resolve_in_one_place(tmp_path, monkeypatch):
    path = RECIPES_DIR / "llama3-8b/qcorda-ipm-metamath.yaml"
    for given in ("llama3-8b/qcorda-ipm-metamath", "llama3-8b/qcorda-ipm-metamath.yaml", "recipes/llama3-8b/qcorda-ipm-metamath.yaml"):
        assert resolve_recipe(given) == path
    assert "accelerate/fsdp_qlora" not in shipped() and resolve_recipe("accelerate/fsdp_qlora", configs=True).is_file()
    with pytest.raises(ConfigError, match="accelerate/fsdp_qlora: no such file"):
        resolve_recipe("accelerate/fsdp_qlora")  # an accelerate config is not a training recipe
    # a file of that name in the working directory wins over the shipped recipe
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3-270m-cpu").write_text((RECIPES_DIR / "gemma3-270m-cpu.yaml").read_text().replace("max_steps: 20", "max_steps: 3"))
    assert load_recipe("gemma3-270m-cpu").train.max_steps == 3
    assert load_recipe("gemma3-270m-cpu.yaml").train.max_steps == 20
    with pytest.raises(ConfigError, match=r"RECIPE llama3-8b/qcorda-ipm: no such file.*closest: llama3-8b/qcorda-ipm-metamath"):
        load_recipe("llama3-8b/qcorda-ipm")


def test_recipes_lists_each_with_the_planners_memory(capsys):
    from qcorda.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines() if line.startswith("| ")}
    assert set(NAMES) <= set(rows)
    for name in NAMES:
        r = load_recipe(name)
        total = plan_recipe(r, "cuda", check=False).plan.total / GB
        model, method, rank, gpu, planned = rows[name]
        assert (model, method, rank) == (r.model, r.init.method, str(r.init.rank))
        assert planned.startswith(f"{total:.2f} GB"), (name, planned)
        if r.gpu_memory_gb is not None:
            assert gpu == f"{r.gpu_memory_gb:g} GB" and planned.endswith("(fits)")
    assert "accelerate/fsdp_qlora" in out and "accelerate/fsdp_qlora" not in rows
    assert main(["recipes", "--device", "cpu"]) == 0
    cpu = capsys.readouterr().out
    assert f"{plan_recipe(load_recipe('gemma3-270m-cpu'), 'cpu', check=False).plan.total / GB:.2f} GB" in cpu


def test_recipes_copy(tmp_path, capsys):
    from qcorda.cli import main

    assert main(["recipes", "copy", "llama3-8b/qcorda-ipm-metamath", str(tmp_path / "mine")]) == 0
    copied = tmp_path / "mine" / "qcorda-ipm-metamath.yaml"
    assert copied.read_text() == (RECIPES_DIR / "llama3-8b/qcorda-ipm-metamath.yaml").read_text()
    assert f"qcorda train {copied}" in capsys.readouterr().out
    copied.write_text(copied.read_text().replace("rank: 64", "rank: 32"))
    assert main(["recipes", "copy", "llama3-8b/qcorda-ipm-metamath", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --force" in err and "llama3-8b/qcorda-ipm-metamath" in err
    assert load_recipe(copied).init.rank == 32, "a refused copy leaves the edited file alone"
    assert main(["recipes", "copy", "llama3-8b/qcorda-ipm-metamath", str(tmp_path / "mine"), "--force"]) == 0
    assert load_recipe(copied).init.rank == 64
    assert main(["recipes", "copy", "gemma3-270m-cpu", str(tmp_path / "x.yaml")]) == 0 and (tmp_path / "x.yaml").is_file()
    assert main(["recipes", "copy", "accelerate/fsdp_qlora", str(tmp_path)]) == 0 and (tmp_path / "fsdp_qlora.yaml").is_file()
    assert main(["recipes", "copy", "gemma3-270m", str(tmp_path / "y")]) == 2
    assert "RECIPE gemma3-270m: no such file, and no shipped recipe has that name (closest: gemma3-270m-cpu)" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
