"""Every static rule holds on the real repository, and the registry resolves at import."""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import pytest

from tests.static.rules import (
    CAUSAL_PP,
    CAUSAL_RMPAD,
    CLASS_MODULES,
    PP_CLASSES,
    PP_INIT_PARAMS,
    REGISTRY_ARCH,
    REGISTRY_ROLES,
    REPO_ROOT,
    RULES,
    VALUE_PP,
    VALUE_RMPAD,
    Project,
    Rule,
    path_group,
    qualify,
)


@pytest.fixture(scope="module")
def project() -> Project:
    return Project.from_repo()


def test_scan_covers_library_and_tests(project: Project) -> None:
    # A scan that found nothing would make every rule below pass vacuously.
    paths = {source.path for source in project.files()}
    assert {"splitllama/registry.py", "splitllama/cli.py", "tests/static/rules.py"} <= paths
    assert all(path_group(path) is not None for path in paths)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: f"{rule.id}-{rule.name}")
def test_repository_follows(rule: Rule, project: Project) -> None:
    violations = rule.check_project(project)
    assert not violations, (f"{len(violations)} violation(s) of {rule.id} ({rule.purpose}):\n"
                            + "\n".join(map(str, violations)))


def _production_importable() -> None:
    """Skip, naming what is missing, when the registry's classes cannot be imported yet."""
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec(
            "megatron.core") is None:
        pytest.skip("megatron-core is not installed; the registry's classes need it")
    missing = sorted({module for module in CLASS_MODULES.values()
                      if not (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file()})
    if missing:
        pytest.skip(f"production modules not written yet: {', '.join(missing)}")


def _load(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_registry_resolves_at_import() -> None:
    _production_importable()
    from splitllama.registry import ModelRegistry

    assert ModelRegistry.get_supported_archs() == [REGISTRY_ARCH]
    assert ModelRegistry.load_model_cls("LlamaForCausalLM") is None
    causal_pp = ModelRegistry.load_model_cls(REGISTRY_ARCH, value=False)
    value_pp = ModelRegistry.load_model_cls(REGISTRY_ARCH, value=True)
    assert causal_pp is _load(qualify(CAUSAL_PP))
    assert value_pp is _load(qualify(VALUE_PP))
    from splitllama.registry import _MODELS

    assert tuple(map(_load, _MODELS[REGISTRY_ARCH])) == tuple(
        _load(qualify(name)) for name in REGISTRY_ROLES)


@pytest.mark.parametrize("pp_name", list(PP_CLASSES))
def test_pipeline_classes_at_import(pp_name: str) -> None:
    """What SL103 checks by parsing, checked on the imported classes: the non-PP base, and a
    pipeline __init__ and set_input_tensor that the non-PP base does not supply."""
    _production_importable()
    pp_cls = _load(qualify(pp_name))
    base = _load(qualify(PP_CLASSES[pp_name]))
    assert issubclass(pp_cls, base)
    for method in ("__init__", "set_input_tensor"):
        assert getattr(pp_cls, method) is not getattr(base, method, None), (
            f"{pp_name}.{method} is the non-pipeline one")
    params = list(inspect.signature(pp_cls.__init__).parameters.values())[1:]
    assert tuple(p.name for p in params[:len(PP_INIT_PARAMS)]) == PP_INIT_PARAMS
    assert params[len(PP_INIT_PARAMS) - 1].default is False


def _owner(cls: type, method: str) -> type:
    return next(c for c in cls.__mro__ if method in vars(c))


def test_head_methods_at_import() -> None:
    """What SL102 / SL104 check by parsing: the value model extends the CausalLM, and each
    PP class takes its head from the model of its own kind."""
    _production_importable()
    causal, value = _load(qualify(CAUSAL_RMPAD)), _load(qualify(VALUE_RMPAD))
    assert causal in value.__bases__
    for method in ("_init_head", "_forward_head"):
        assert _owner(value, method) is value
        assert issubclass(_owner(_load(qualify(VALUE_PP)), method), value)
        assert not issubclass(_owner(_load(qualify(CAUSAL_PP)), method), value)
