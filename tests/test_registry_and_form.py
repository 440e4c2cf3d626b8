"""Refusals at the edges a reviewer found loose: the demo form's parsing, `register_method`'s arguments, and two
config options (GNA's is_causal, editing's reweight) that failed late with raw Python errors."""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import textwrap
from typing import ClassVar

import pytest

import accel
from accel import registry
from accel.config import EditConfig, GNAConfig, MethodConfig
from accel.errors import InvalidOptionError
from demo.form import DEFAULT_CHOICE, FieldSpec


@pytest.fixture
def clean_registry():
    """Whatever a test registers is removed afterwards, and a built-in it managed to replace is put back (and the
    test fails), so that no other test sees a changed registry."""
    before = dict(registry._METHODS)
    yield
    for name in set(registry._METHODS) - set(before):
        accel.unregister_method(name)
    changed = [name for name, info in before.items() if registry._METHODS.get(name) is not info]
    registry._METHODS.update(before)
    assert not changed, f"the test replaced registered methods {changed}"


def _noop(plan, config):
    pass


@dataclasses.dataclass(kw_only=True)
class _FreeConfig(MethodConfig):
    """A method with every option defaulted.

    Args:
        radius (`int`, defaults to `3`): radius.
    """

    name: ClassVar[str] = "test-free"
    radius: int = 3


@dataclasses.dataclass(kw_only=True)
class _RequiredConfig(MethodConfig):
    """A method with an option the user must give.

    Args:
        radius (`int`): radius.
    """

    name: ClassVar[str] = "test-required"
    radius: int


# 1. The demo form's parsing.


def spec(kind, optional=False):
    return FieldSpec(name="radius", kind=kind, default=None, optional=optional, help="")


@pytest.mark.parametrize(
    "raw, expected",
    [(True, True), (False, False), ("false", False), ("FALSE", False), ("True", True), (" true ", True)],
)
def test_bool_fields_read_true_and_false(raw, expected):
    assert spec("bool").parse(raw) is expected


@pytest.mark.parametrize("raw", ["no", "0", "", 1, None])
def test_bool_fields_refuse_other_values(raw):
    with pytest.raises(InvalidOptionError, match=r"radius: expected True or False"):
        spec("bool").parse(raw)


def test_an_optional_bool_field_keeps_none():
    assert spec("bool", optional=True).parse(None) is None


def test_an_optional_bool_field_offers_its_default_as_a_third_choice():
    # A checkbox cannot show None: the demo sent it back as False, changing the option.
    field = spec("bool", optional=True)
    assert field.initial() == DEFAULT_CHOICE and field.parse(DEFAULT_CHOICE) is None
    assert FieldSpec(name="radius", kind="bool", default=True, optional=True, help="").initial() == "true"
    with pytest.raises(InvalidOptionError, match=r"radius: expected True or False"):
        spec("bool").parse(DEFAULT_CHOICE)


@pytest.mark.parametrize("raw, expected", [(4, 4), (4.0, 4), ("4", 4), ("4.0", 4), (" 7 ", 7), (None, None)])
def test_int_fields_read_whole_numbers(raw, expected):
    assert spec("int").parse(raw) == expected


def test_int_fields_keep_large_integers_exact():
    assert spec("int").parse(str(2**53 + 1)) == 2**53 + 1


@pytest.mark.parametrize(
    "raw, words",
    [
        (math.inf, "is not a whole number"),  # int(inf) was an OverflowError the demo did not catch
        ("inf", "is not a whole number"),
        ("nan", "is not a whole number"),
        ("4.5", "is not a whole number"),
        (4.5, "is not a whole number"),
        ("abc", "'abc' is not a number; expected a whole number"),
        (True, "expected a whole number"),
        ([4], "expected a whole number"),
    ],
)
def test_int_fields_refuse_other_values_naming_the_field(raw, words):
    with pytest.raises(InvalidOptionError, match=rf"^radius: .*{words}"):
        spec("int").parse(raw)


def test_float_fields_name_the_field():
    assert spec("float").parse("0.5") == 0.5
    with pytest.raises(InvalidOptionError, match=r"^radius: 'abc' is not a number; expected a number"):
        spec("float").parse("abc")


@pytest.mark.parametrize("raw", [5, [4, 4], {"a": 1}])
def test_json_fields_refuse_values_that_are_not_text(raw):
    with pytest.raises(InvalidOptionError, match=r"^radius: expected JSON text"):
        spec("json").parse(raw)


def test_json_fields_name_the_field_on_bad_json():
    assert spec("json").parse("[4, 4]") == [4, 4]
    with pytest.raises(InvalidOptionError, match=r"^radius: '\[4,' is not JSON"):
        spec("json").parse("[4,")


def test_the_demo_shows_a_bad_setting_as_a_message():
    gr = pytest.importorskip("gradio")
    from demo.app import _selected_options
    from demo.form import config_fields

    fields = {"test-free": config_fields(_FreeConfig)}
    assert [s.name for s in fields["test-free"]] == ["layers", "radius"]
    assert _selected_options(fields, "test-free", ("", "5")) == {"radius": 5}
    with pytest.raises(gr.Error, match="radius: 'inf' is not a whole number"):
        _selected_options(fields, "test-free", ("", "inf"))


# 2. Config classes with a required option.


def test_a_config_with_a_required_option_is_refused(clean_registry):
    with pytest.raises(TypeError, match=r"_RequiredConfig\.radius has no default; every option of a method needs"):
        accel.register_method(_RequiredConfig, families=("unet",))
    assert "test-required" not in {m.name for m in accel.methods()}


def test_the_demo_builds_after_a_required_option_was_refused(clean_registry):
    pytest.importorskip("gradio")
    from demo.app import build_app

    with pytest.raises(TypeError, match="has no default"):
        accel.register_method(_RequiredConfig, families=("unet",))(_noop)
    build_app()


def test_default_factories_count_as_defaults(clean_registry):
    @dataclasses.dataclass(kw_only=True)
    class _FactoryConfig(MethodConfig):
        name: ClassVar[str] = "test-factory"
        words: list[str] = dataclasses.field(default_factory=list)

    accel.register_method(_FactoryConfig, families=("unet",))(_noop)
    assert "test-factory" in {m.name for m in accel.methods()}


# 3. register_method's other arguments.


def test_a_name_registers_once(clean_registry):
    original = accel.methods()
    with pytest.raises(ValueError, match=r"'dense' is already registered .*register under another name"):
        accel.register_method(accel.DenseConfig, families=("unet",))(_noop)
    assert accel.methods() == original

    accel.register_method(_FreeConfig, families=("unet",))(_noop)

    def other(plan, config):
        pass

    with pytest.raises(ValueError, match=r"accel.unregister_method\('test-free'\) first"):
        accel.register_method(_FreeConfig, families=("unet",))(other)
    # Unregistering first is how a method is replaced on purpose.
    accel.unregister_method("test-free")
    accel.register_method(_FreeConfig, families=("unet", "flux"))(other)
    assert registry.method_info("test-free").applier is other


def test_registering_the_same_applier_again_is_harmless(clean_registry):
    accel.register_method(_FreeConfig, families=("unet",))(_noop)
    accel.register_method(_FreeConfig, families=("unet",))(_noop)
    assert registry.method_info("test-free").applier is _noop


def test_reloading_a_plugin_module_registers_its_method_again(clean_registry, tmp_path, monkeypatch):
    # A reload makes new class and function objects under the same names; that is not a second method.
    (tmp_path / "accel_test_plugin.py").write_text(
        textwrap.dedent(
            '''
            import dataclasses
            from typing import ClassVar

            import accel
            from accel.config import MethodConfig


            @dataclasses.dataclass(kw_only=True)
            class PluginConfig(MethodConfig):
                """A plugin."""

                name: ClassVar[str] = "test-plugin"


            @accel.register_method(PluginConfig, families=("unet",))
            def apply_plugin(plan, config):
                pass
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("accel_test_plugin")
        first = registry.method_info("test-plugin").applier
        module = importlib.reload(module)
        assert registry.method_info("test-plugin").applier is module.apply_plugin is not first
    finally:
        sys.modules.pop("accel_test_plugin", None)


def test_a_non_callable_applier_is_refused(clean_registry):
    with pytest.raises(TypeError, match=r"decorates the applier, a function applier\(plan, config\); got int 42"):
        accel.register_method(_FreeConfig, families=("unet",))(42)
    assert "test-free" not in {m.name for m in accel.methods()}


def test_families_as_a_bare_string_is_refused(clean_registry):
    with pytest.raises(TypeError, match=r"families must be a tuple of family names, e.g. families=\(\"unet\",\)"):
        accel.register_method(_FreeConfig, families="unet")


# 4 and 5. Config options that failed with raw Python errors.


@pytest.mark.parametrize("value", [1, None, 0.0, (), (True, 1)])
def test_gna_is_causal_must_be_bools(value):
    with pytest.raises(InvalidOptionError, match=r"is_causal=.* must be a bool or one bool per axis"):
        GNAConfig(is_causal=value)


def test_gna_is_causal_accepts_a_bool_or_one_per_axis():
    assert GNAConfig(is_causal=True).is_causal is True
    assert GNAConfig(is_causal=[True, False]).is_causal == (True, False)


@pytest.mark.parametrize("reweight", [{1: 2.0}, {None: 1.0}, {("green",): 2.0}])
def test_edit_reweight_keys_must_be_words(reweight):
    with pytest.raises(InvalidOptionError, match=r"reweight=.* must map words \(strings\) to factors"):
        EditConfig(reweight=reweight)


def test_edit_reweight_accepts_words():
    assert EditConfig(reweight={"green": 2.0}).reweight == {"green": 2.0}
