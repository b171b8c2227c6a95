"""The house rules: which layer may import which (walked from the source, function-level imports
included), and every model's declared contract (``recbole_mm.model.abstract``) against its props."""

from __future__ import annotations

import ast
import os

import pytest

import recbole_mm

PACKAGE = os.path.dirname(os.path.abspath(recbole_mm.__file__))

# (importing layer, imported layer): forbidden.  A layer is a sub-package (model, data, pipeline,
# trainer) or a top-level module; "cli" is the command-line layer (recbole_mm.cli).
FORBIDDEN = {
    ("model", "pipeline"),  # models use recbole_mm.encoders, never the feature pipeline
    ("data", "pipeline"),
    ("data", "model"),
    ("model", "trainer"),   # shared errors live in recbole_mm.errors
    ("trainer", "cli"),
}

# Violations accepted for now, each with its reason (none today); an entry no longer needed fails.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def _modules() -> dict[str, str]:
    """Dotted module name -> source file, for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(PACKAGE))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


def _imports(name: str, path: str, known: dict) -> set[str]:
    """Every ``recbole_mm`` module ``name`` imports, at module or function level (``from recbole_mm.x
    import y`` counts as ``recbole_mm.x.y`` when that is a module, else ``recbole_mm.x``)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m == "recbole_mm" or m.startswith("recbole_mm.")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "recbole_mm"


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_the_walk_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "recbole_mm.encoders" in graph["recbole_mm.model.pmmrec"]
    assert "recbole_mm.pipeline.images" in graph["recbole_mm.pipeline.prepare"]  # imported inside a function
    assert len(graph) > 30


def test_layer_rules():
    offending = set()
    for module, imported in import_graph().items():
        for target in imported:
            forbidden = (_layer(module), _layer(target)) in FORBIDDEN
            cli = (target == "recbole_mm.cli" and module != "recbole_mm.cli"  # only cli.py itself and
                   and not module.endswith(".__main__"))  # entry points (python -m ...), as run_*.py
            if forbidden or cli:
                offending.add((module, target))
    unexpected = sorted(offending - KNOWN_EXCEPTIONS)
    assert not unexpected, "imports against the layer rules (module, imported):\n" + "\n".join(
        f"  {m} -> {t}" for m, t in unexpected)
    stale = sorted(KNOWN_EXCEPTIONS - offending)
    assert not stale, f"KNOWN_EXCEPTIONS no longer needed (remove them): {stale}"


# -- the model contract ------------------------------------------------------------------------------
def _required_keys(cls) -> set[str]:
    """Keys the model's module (and its bases') read with ``required(config, "key")`` / ``one_of``."""
    keys = set()
    for klass in cls.__mro__:
        module = klass.__module__
        if not module.startswith("recbole_mm.model."):
            continue
        path = _modules()[module]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("required", "one_of")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                keys.add(node.args[1].value)
    return keys


def _models():
    from recbole_mm.model import our_models

    return our_models()


@pytest.mark.parametrize("name", sorted(_models()))
def test_every_model_declares_a_contract_consistent_with_its_props(name):
    from recbole_mm.config import Config
    from recbole_mm.model.abstract import MMSequentialRecommender, catalogue_buffers, is_language_model, model_stages

    cls = _models()[name]
    stages = model_stages(cls)
    if not issubclass(cls, MMSequentialRecommender):
        assert stages == () and not is_language_model(cls) and not catalogue_buffers(cls)
        return
    assert stages and "pretrain" in stages and all(s in ("pretrain", "inductive_ft", "transductive_ft") for s in stages)
    assert is_language_model(cls) == (name in ("Recformer", "ReoLM"))
    source = "".join(open(_modules()[k.__module__], encoding="utf-8").read() for k in cls.__mro__
                     if k.__module__.startswith("recbole_mm.model."))
    for buffer in catalogue_buffers(cls):
        assert f'register_buffer("{buffer}"' in source, f"{name}.CATALOGUE_BUFFERS: {buffer} is not a buffer"
    wanted = _required_keys(cls)
    assert wanted, f"{name} reads no key through required()"
    for stage in ("finetune", "pretrain"):
        config = Config(cls, "Tiny", stage)
        assert config["train_stage"] in stages, (stage, config["train_stage"])
        missing = sorted(k for k in wanted if k not in config)
        assert not missing, f"{name} ({stage}): keys without a default in props/: {missing}"


def test_a_key_missing_from_every_layer_is_a_clear_error():
    from recbole_mm.errors import MissingConfigKey
    from recbole_mm.model.abstract import one_of, required

    assert required({"a": None}, "a", "UniSRec") is None  # ~ in a YAML file is a value
    assert one_of({"fusion": "sum"}, "fusion", ("sum", "gated"), "PMMRec") == "sum"
    with pytest.raises(ValueError, match=r"PMMRec: fusion must be one of \('sum',\), got 'x'"):
        one_of({"fusion": "x"}, "fusion", ("sum",), "PMMRec")
    with pytest.raises(MissingConfigKey, match=r"'n_exps'.*props/UniSRec\.yaml"):
        required({"model": "UniSRec"}, "n_exps")
    with pytest.raises(KeyError):  # MissingConfigKey is a KeyError, and a ConfigError (one line from the CLI)
        required({}, "n_exps", "UniSRec")
    from recbole_mm.config import ConfigError

    assert issubclass(MissingConfigKey, ConfigError)


def test_contract_helpers_work_for_recbole_models():
    from recbole_mm.model.abstract import epoch_hook, is_language_model, model_stages
    from recbole_mm.model.missrec import MISSRec
    from recbole_mm.model.unisrec import UniSRec
    from recbole_mm.utils import get_model

    assert model_stages(get_model("SASRec")) == () and model_stages(get_model("S3Rec")) == ("pretrain", "finetune")
    assert not is_language_model(get_model("SASRec"))
    assert epoch_hook(object.__new__(UniSRec)) is None  # the base's no-op: the trainer skips it
    assert epoch_hook(object.__new__(MISSRec)) is not None
