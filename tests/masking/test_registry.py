"""Tests of the strategy registry: decorator errors, entry points, and short names through jsonargparse."""

from __future__ import annotations

import importlib
import importlib.metadata
import pickle
import subprocess
import sys
import textwrap
from typing import Optional

import pytest
from jsonargparse import ArgumentParser

import mthlib.masking.names as names
from mthlib.masking import (
    MaskStrategy,
    available_masks,
    build_mask,
    get_mask_class,
    load_short_names,
    mask_summaries,
    register_mask,
)


@register_mask("toy_mask")
class Toy(MaskStrategy):
    """Toy test strategy: keeps the largest weights.

    Args:
        sparsity: Fraction of eligible entries that stay frozen.
        seed: Unused seed.
    """

    def __init__(self, sparsity: float = 0.99, seed: int = 0) -> None:
        super().__init__(sparsity, seed=seed)

    def compute(self, model, batches):
        return self.top_k({n: p.detach().abs() for n, p in self.eligible(model).items()})


class Holder:
    """A configurable class with a mask argument, like the GRPO module."""

    def __init__(self, mask: MaskStrategy | None = None, lr: float = 1e-3) -> None:
        self.mask = mask
        self.lr = lr


@pytest.fixture
def no_entry_points(monkeypatch):
    """Keep the installed built-in strategies out of these tests."""
    original = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group=None: [] if group == "mthlib.masks" else original(group=group)
    )


def test_register_sets_name_and_creates_alias():
    alias = names.toy_mask
    assert Toy.name == "toy_mask"
    assert alias is not Toy and issubclass(alias, Toy)
    assert (alias.__name__, alias.__qualname__, alias.__module__) == ("toy_mask", "toy_mask", "mthlib.masking.names")
    assert alias.__doc__ == Toy.__doc__
    instance = alias(sparsity=0.5)
    assert type(instance).name == "toy_mask" and instance.sparsity == 0.5
    assert instance.config()["class_path"] == f"{__name__}.Toy"
    restored = pickle.loads(pickle.dumps(instance))
    assert type(restored) is alias and restored.sparsity == 0.5


def test_lookup_and_build(no_entry_points):
    assert get_mask_class("toy_mask") is Toy
    built = build_mask("toy_mask", sparsity=0.9)
    assert isinstance(built, Toy) and built.sparsity == 0.9
    assert available_masks()["toy_mask"] is Toy
    assert mask_summaries()["toy_mask"] == "Toy test strategy: keeps the largest weights."
    assert "toy_mask" in load_short_names()


def test_unknown_name_lists_registered(no_entry_points):
    with pytest.raises(ValueError, match=r"unknown mask strategy 'nope'; registered: .*toy_mask"):
        get_mask_class("nope")
    with pytest.raises(AttributeError, match="no mask strategy 'nope'"):
        names.nope  # noqa: B018


@pytest.mark.parametrize("bad", ["Toy", "1mask", "my-mask", "", "a b"])
def test_badly_formed_names_are_refused(bad):
    with pytest.raises(ValueError, match="lowercase letters, digits and underscores"):
        register_mask(bad)


def test_duplicate_alias_abstract_and_foreign_classes_are_refused():
    class Other(Toy):
        """Another class."""

    with pytest.raises(ValueError, match=r"'toy_mask' is already registered by .*Toy; choose another name for .*Other"):
        register_mask("toy_mask")(Other)
    with pytest.raises(ValueError, match="already registered as 'toy_mask'"):
        register_mask("toy_mask_again")(Toy)
    with pytest.raises(ValueError, match="short-name alias"):
        register_mask("alias_again")(names.toy_mask)

    class Abstract(MaskStrategy):
        """Forgot compute."""

    with pytest.raises(TypeError, match="does not implement compute"):
        register_mask("abstract_mask")(Abstract)
    with pytest.raises(TypeError, match="decorates MaskStrategy subclasses"):
        register_mask("not_a_mask")(dict)


PLUGIN = '''
"""A third-party plugin module."""
from mthlib.masking import MaskStrategy, register_mask


@register_mask("{name}")
class PluginMask(MaskStrategy):
    """Plugin strategy registered by its own decorator."""

    def compute(self, model, batches):
        raise NotImplementedError


class PlainMask(MaskStrategy):
    """Plugin strategy without a decorator: the entry point name registers it."""

    def compute(self, model, batches):
        raise NotImplementedError
'''


def _plugin(tmp_path, module: str, name: str) -> None:
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(name=name))


def test_entry_points_register_modules_and_classes(tmp_path, monkeypatch):
    _plugin(tmp_path, "mth_plugin_a", "plugin_a")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = "mthlib.masks"
    points = [
        importlib.metadata.EntryPoint("plugin_a", "mth_plugin_a", group),
        importlib.metadata.EntryPoint("plain_a", "mth_plugin_a:PlainMask", group),
        importlib.metadata.EntryPoint("broken_a", "mth_plugin_missing", group),
    ]
    calls = []

    original = importlib.metadata.entry_points

    def fake_entry_points(group=None):
        if group != "mthlib.masks":
            return original(group=group)
        calls.append(group)
        return points

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    with pytest.warns(UserWarning, match="entry point 'broken_a'.*failed to load"):
        masks = available_masks()
    assert calls == ["mthlib.masks"]
    assert masks["plugin_a"].__name__ == "PluginMask" and masks["plugin_a"].name == "plugin_a"
    assert masks["plain_a"].__name__ == "PlainMask" and masks["plain_a"].name == "plain_a"
    assert issubclass(names.plain_a, masks["plain_a"])


def test_alias_imports_in_a_fresh_process(tmp_path):
    _plugin(tmp_path, "mth_plugin_b", "plugin_b")
    script = textwrap.dedent(f"""
        import importlib.metadata, sys
        sys.path.insert(0, {str(tmp_path)!r})
        point = importlib.metadata.EntryPoint("plugin_b", "mth_plugin_b", "mthlib.masks")
        original = importlib.metadata.entry_points
        importlib.metadata.entry_points = lambda group=None: [point] if group == "mthlib.masks" else original(group=group)
        from jsonargparse._util import import_object
        cls = import_object("mthlib.masking.names.plugin_b")
        print(cls.__name__, cls.name, cls.__mro__[1].__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["plugin_b", "plugin_b", "PluginMask"]


def _parser() -> ArgumentParser:
    load_short_names()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--mask", type=Optional[MaskStrategy])
    return parser


def test_jsonargparse_accepts_short_names_on_the_command_line(no_entry_points):
    parser = _parser()
    init = parser.instantiate(parser.parse_args(["--mask", "toy_mask", "--mask.sparsity", "0.9"]))
    assert type(init.mask).name == "toy_mask" and isinstance(init.mask, Toy)
    assert init.mask.sparsity == 0.9 and init.mask.seed == 0


def test_jsonargparse_accepts_short_names_in_configs(no_entry_points):
    parser = _parser()
    for config in (
        parser.parse_string("mask:\n  class_path: toy_mask\n  init_args:\n    sparsity: 0.9\n"),
        parser.parse_object({"mask": {"class_path": "toy_mask", "init_args": {"sparsity": 0.9}}}),
    ):
        mask = parser.instantiate(config).mask
        assert isinstance(mask, Toy) and mask.sparsity == 0.9
    plain = parser.instantiate(parser.parse_string("mask: toy_mask\n")).mask
    assert isinstance(plain, Toy) and plain.sparsity == 0.99
    full = parser.parse_object({"mask": {"class_path": f"{__name__}.Toy", "init_args": {"seed": 3}}})
    assert parser.instantiate(full).mask.seed == 3
    dumped = parser.dump(parser.parse_args(["--mask", "toy_mask", "--mask.seed", "5"]))
    assert "class_path: mthlib.masking.names.toy_mask" in dumped
    again = parser.instantiate(parser.parse_string(dumped)).mask
    assert isinstance(again, Toy) and again.seed == 5


SHORT_FORM = '''
"""A user's strategy module: its own argument, the shared options through **options."""
from typing import Any

from mthlib.masking import MaskStrategy, register_mask


@register_mask("short_form_mask")
class ShortForm(MaskStrategy):
    """Keeps the largest |w| ** power.

    Args:
        power: Exponent of the magnitude.
        **options: The shared options of MaskStrategy.
    """

    def __init__(self, power: float = 1.0, **options: Any) -> None:
        super().__init__(**options)
        self.power = power

    def compute(self, model, batches):
        return self.top_k({n: p.detach().abs() ** self.power for n, p in self.eligible(model).items()})
'''


def test_a_new_strategy_file_gets_the_shared_options(tmp_path, monkeypatch, no_entry_points):
    (tmp_path / "test_short_form_plugin.py").write_text(SHORT_FORM)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("test_short_form_plugin")
    assert get_mask_class("short_form_mask") is module.ShortForm
    parser = _parser()
    config = parser.parse_string(
        "mask:\n  class_path: short_form_mask\n"
        "  init_args: {power: 2.0, sparsity: 0.9, seed: 7, include: ['*.mlp.*'], include_norms: true}\n"
    )
    mask = parser.instantiate(config).mask
    assert isinstance(mask, module.ShortForm) and (mask.power, mask.sparsity, mask.seed) == (2.0, 0.9, 7)
    assert mask.config() == {
        "class_path": "test_short_form_plugin.ShortForm", "name": "short_form_mask",
        "init_args": {"power": 2.0, "sparsity": 0.9, "allocation": "global", "include": ["*.mlp.*"],
                      "exclude": None, "include_norms": True, "include_biases": False,
                      "include_embeddings": True, "seed": 7, "exclude_mask": None},
    }
    cli = parser.instantiate(parser.parse_args(["--mask", "short_form_mask", "--mask.seed", "3"])).mask
    assert cli.seed == 3 and cli.power == 1.0 and cli.config()["init_args"]["seed"] == 3
    dumped = parser.dump(parser.parse_args(["--mask", "short_form_mask"]), skip_unset=False)
    assert all(f"{key}:" in dumped for key in mask.config()["init_args"])  # --print_config shows every option
    with pytest.raises(Exception, match="sead"):
        parser.parse_args(["--mask", "short_form_mask", "--mask.sead", "3"])


def test_jsonargparse_class_argument_like_the_module(no_entry_points):
    load_short_names()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Holder, "model")
    init = parser.instantiate(parser.parse_args(["--model.mask", "toy_mask", "--model.mask.sparsity", "0.8"]))
    assert isinstance(init.model.mask, Toy) and init.model.mask.sparsity == 0.8


def test_jsonargparse_rejects_unknown_short_names(no_entry_points):
    parser = _parser()
    with pytest.raises(Exception, match="nope_mask"):
        parser.parse_args(["--mask", "nope_mask"])
    with pytest.raises(Exception, match="sparsity must be in"):
        parser.instantiate(parser.parse_args(["--mask", "toy_mask", "--mask.sparsity", "1.5"]))
