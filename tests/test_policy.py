"""Policy parsing, validation, precedence and file round trips (no torch.compile)."""

from __future__ import annotations

import json
import os.path
import tomllib
from pathlib import Path

import pytest
import yaml

from attncc.codegen.variants.attnres import AttnRes, ResidualKeep
from attncc.codegen.variants.keep import Keep
from attncc.codegen.variants.linear import Linear
from attncc.codegen.variants.mala import Mala
from attncc.codegen.variants.softmax import Softmax
from attncc.codegen.variants.softplus import Softplus
from attncc.codegen.variants.sparse import Sparse
from attncc.codegen.variants.sqa import SQA
from attncc.policy import (
    ATTENTION_VARIANTS,
    RESIDUAL_VARIANTS,
    AttentionPolicy,
    Policy,
    PolicyError,
    Rule,
    Target,
    Where,
    _toml_dumps,
    check_sites,
    dump_policy,
    load_policy,
)

POLICIES = Path(__file__).resolve().parent.parent / "attncc" / "policies"


def with_default(use: object) -> dict:
    return {"version": 1, "attention": {"default": use}}


@pytest.mark.parametrize(
    "name, cls, params",
    [
        ("keep", Keep, {}),
        ("softmax", Softmax, {"kernel": "auto"}),
        ("linear", Linear, {"feature_map": "elu1", "normalize": True, "decay": "none", "eps": 1e-6}),
        ("sparse", Sparse, {"pattern": "sliding_window", "window": 1024, "sinks": 0, "block": 128,
                            "window_blocks": 5, "mask": None}),
        ("softplus", Softplus, {"reweight_p": 15.0}),
        ("mala", Mala, {"sim_scale": None}),
        ("sqa", SQA, {"query_heads": None, "kv_heads": None, "init": "mean", "kernel": "auto"}),
    ],
)
def test_attention_variant_defaults(name, cls, params):
    assert ATTENTION_VARIANTS[name] is cls and cls.variant == name
    for use in (name, {"variant": name}):
        variant = load_policy(with_default(use)).attention.default
        assert variant == cls() and variant.params() == params


@pytest.mark.parametrize(
    "use, expected",
    [
        ({"variant": "linear", "feature_map": "taylor2", "normalize": False, "decay": "lightning", "eps": 0},
         Linear(feature_map="taylor2", normalize=False, decay="lightning", eps=0.0)),
        ({"variant": "linear", "feature_map": "relu", "decay": 0.9}, Linear(feature_map="relu", decay=0.9)),
        ({"variant": "linear", "feature_map": "identity", "decay": 1}, Linear(feature_map="identity", decay=1.0)),
        ({"variant": "sparse", "window": 512, "sinks": 4}, Sparse(window=512, sinks=4)),
        ({"variant": "sparse", "pattern": "power", "block": 256, "window_blocks": 3},
         Sparse(pattern="power", block=256, window_blocks=3)),
        ({"variant": "sparse", "pattern": "block", "block": 64, "mask": "pkg.masks:diag"},
         Sparse(pattern="block", block=64, mask="pkg.masks:diag")),
        ({"variant": "softplus", "reweight_p": 0}, Softplus(reweight_p=0.0)),
        ({"variant": "softplus", "reweight_p": 3.5}, Softplus(reweight_p=3.5)),
        ({"variant": "mala", "sim_scale": 0.125}, Mala(sim_scale=0.125)),
        ({"variant": "sqa", "query_heads": 8, "kv_heads": 2, "init": "select"},
         SQA(query_heads=8, kv_heads=2, init="select")),
    ],
)
def test_attention_variant_params(use, expected):
    assert load_policy(with_default(use)).attention.default == expected


def test_ints_widen_to_float():
    assert type(Softplus(reweight_p=3).reweight_p) is float
    assert type(Linear(decay=1).decay) is float


@pytest.mark.parametrize(
    "residual, expected",
    [
        ("keep", ResidualKeep()),
        ("attnres", AttnRes()),
        ({"variant": "attnres", "block_size": 8}, AttnRes(block_size=8)),
        ({"use": "keep"}, ResidualKeep()),
        ({"use": "attnres"}, AttnRes(block_size=1)),
        ({"use": {"variant": "attnres", "block_size": 4}}, AttnRes(block_size=4)),
    ],
)
def test_residual_forms(residual, expected):
    assert RESIDUAL_VARIANTS[expected.variant] is type(expected)
    assert load_policy({"residual": residual}).residual == expected


@pytest.mark.parametrize(
    "attention, expected",
    [
        ("linear", AttentionPolicy(default=Linear())),
        ({"variant": "sqa", "query_heads": 4}, AttentionPolicy(default=SQA(query_heads=4))),
        ({}, AttentionPolicy()),
        ({"rules": [{"where": {"layers": 0}, "use": "softmax"}]},
         AttentionPolicy(rules=(Rule(Where(layers=((0, 0),)), Softmax()),))),
    ],
)
def test_attention_forms(attention, expected):
    assert load_policy({"attention": attention}).attention == expected


@pytest.mark.parametrize(
    "layers, expected",
    [
        (3, ((3, 3),)),
        ("3", ((3, 3),)),
        ("0-5", ((0, 5),)),
        (" 2 - 4 ", ((2, 4),)),
        ("20-", ((20, None),)),
        ([0, "2-3", "10-"], ((0, 0), (2, 3), (10, None))),
        (((1, 2), (5, None)), ((1, 2), (5, None))),
    ],
)
def test_layers_syntax(layers, expected):
    assert Where(layers=layers).layers == expected
    assert Where(layers=expected).layers == expected


POLICY_FOR_CHOOSE = {
    "attention": {
        "default": "softmax",
        "rules": [
            {"where": {"layers": "0-1"}, "use": "keep"},
            {"where": {"layers": "1-3", "module": "*.cross_attn"}, "use": "mala"},
            {"where": {"module": "model.layers.*.self_attn"}, "use": {"variant": "linear", "decay": 0.5}},
            {"where": {"layers": ["5", "10-"]}, "use": "sqa"},
        ],
    }
}


@pytest.mark.parametrize(
    "module, layer, expected, index",
    [
        ("model.layers.0.self_attn", 0, Keep(), 0),
        ("model.layers.1.cross_attn", 1, Keep(), 0),
        ("model.layers.2.cross_attn", 2, Mala(), 1),
        ("model.layers.4.cross_attn", 4, Softmax(), None),
        ("model.layers.2.self_attn", 2, Linear(decay=0.5), 2),
        ("model.layers.5.self_attn", 5, Linear(decay=0.5), 2),
        ("model.layers.5.mlp_attn", 5, SQA(), 3),
        ("model.layers.99.mlp_attn", 99, SQA(), 3),
        ("model.layers.9.mlp_attn", 9, Softmax(), None),
        ("encoder.attn", None, Softmax(), None),
        ("model.layers.x.self_attn", None, Linear(decay=0.5), 2),
    ],
)
def test_choose(module, layer, expected, index):
    assert load_policy(POLICY_FOR_CHOOSE).choose(module, layer) == (expected, index)


EVERY_VARIANT = {
    "version": 1,
    "name": 'every "variant" — ü\n\ttab',
    "target": {"device": "cuda", "dtype": "bfloat16", "max_seq_len": 32768},
    "attention": {
        "default": {"variant": "linear", "feature_map": "taylor2", "normalize": False, "decay": 0.99, "eps": 1e-8},
        "rules": [
            {"where": {"layers": "0-1"}, "use": "keep"},
            {"where": {"layers": [2, "3"]}, "use": "softmax"},
            {"where": {"module": "model.layers.4.*"}, "use": {"variant": "linear", "decay": "lightning"}},
            {"where": {"layers": "5"}, "use": {"variant": "sparse", "window": 512, "sinks": 4}},
            {"where": {"layers": "6"}, "use": {"variant": "sparse", "pattern": "power", "block": 256}},
            {"where": {"layers": "7"}, "use": {"variant": "sparse", "pattern": "block", "mask": "m.masks:f"}},
            {"where": {"layers": "8"}, "use": {"variant": "softplus", "reweight_p": 3}},
            {"where": {"layers": "9"}, "use": {"variant": "mala", "sim_scale": 0.25}},
            {"where": {"layers": "10"}, "use": "mala"},
            {"where": {"layers": "11-12", "module": "*.attn"}, "use": {"variant": "sqa", "query_heads": 8,
                                                                         "kv_heads": 2, "init": "select"}},
            {"where": {"layers": "13-"}, "use": "sqa"},
        ],
    },
    "residual": {"use": {"variant": "attnres", "block_size": 8}},
}


def test_every_variant_is_exercised():
    policy = load_policy(EVERY_VARIANT)
    used = {type(rule.use) for rule in policy.attention.rules} | {type(policy.attention.default)}
    assert used == set(ATTENTION_VARIANTS.values())


@pytest.mark.parametrize(
    "policy", [EVERY_VARIANT, {}, {"attention": "mala", "residual": "keep"}], ids=["all", "empty", "bare"]
)
def test_dict_round_trip(policy):
    loaded = load_policy(policy)
    assert load_policy(loaded.to_dict()) == loaded
    assert load_policy(loaded) is loaded


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".toml", ".json"])
def test_file_round_trip(tmp_path, suffix):
    policy = load_policy(EVERY_VARIANT)
    path = tmp_path / f"policy{suffix}"
    dump_policy(policy, path)
    loaded = load_policy(path)
    assert loaded == policy and loaded.source == str(path)
    assert load_policy(str(path)) == policy
    dump_policy(loaded, tmp_path / f"again{suffix}")
    assert (tmp_path / f"again{suffix}").read_text() == path.read_text()


@pytest.mark.parametrize(
    "data",
    [
        {"a": 1, "b": -2.5, "c": True, "d": "x", "e": [1, "two"], "f": {"g": {"h": 1}}},
        {"s": 'quote " backslash \\ newline \n tab \t del \x7f bell \x07 é 😀'},
        {"t": {"rows": [{"x": 1, "y": {"z": "w"}}, {"x": 2}], "empty": []}},
        {"odd key": {"a.b": 1e-6, "big": 1e16}},
    ],
)
def test_toml_emitter(data):
    assert tomllib.loads(_toml_dumps(data)) == data


def test_yaml_reads_floats_without_a_dot(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("attention: {default: {variant: linear, eps: 1e-6}}\n")
    assert load_policy(path).attention.default.eps == 1e-6


@pytest.mark.parametrize("name", ["demo.yaml", "example_all.yaml"])
def test_shipped_policies_load(name):
    policy = load_policy(POLICIES / name)
    assert policy.version == 1 and policy.source.endswith(name)
    assert load_policy(policy.to_dict()) == policy


def test_demo_policy():
    policy = load_policy(POLICIES / "demo.yaml")
    assert policy.choose("model.layers.0.self_attn", 0) == (Keep(), 0)
    assert policy.choose("model.layers.3.self_attn", 3) == (Softmax(), None)


def test_example_all_uses_every_variant():
    policy = load_policy(POLICIES / "example_all.yaml")
    assert {type(rule.use) for rule in policy.attention.rules} == set(ATTENTION_VARIANTS.values())
    assert type(policy.residual) is AttnRes


def rule(where: object, use: object = "keep") -> dict:
    return {"attention": {"rules": [{"where": {"layers": 0}, "use": "keep"}, {"where": where, "use": use}]}}


@pytest.mark.parametrize(
    "data, fragments",
    [
        (rule({"layers": 1}, "liner"),
         ["attention.rules[1].use", "unknown variant 'liner'", "did you mean 'linear'?",
          "Valid: keep, softmax, linear, sparse, softplus, mala, sqa"]),
        (with_default({"variant": "linear", "feature_mpa": "relu"}),
         ["attention.default: unknown parameter 'feature_mpa' for variant 'linear'",
          "did you mean 'feature_map'? Valid: feature_map, normalize, decay, eps"]),
        (with_default({"variant": "keep", "window": 3}), ["attention.default", "unknown parameter 'window'",
                                                          "Valid: (none)"]),
        (with_default({"variant": "linear", "feature_map": "elu"}),
         ["attention.default.feature_map", "'elu'", "did you mean 'elu1'?", "Valid: elu1, relu, identity, taylor2"]),
        (with_default({"variant": "linear", "decay": "lightnin"}),
         ["attention.default.decay", "did you mean 'lightning'?", "none, lightning, a number"]),
        (with_default({"variant": "linear", "decay": 0}), ["attention.default.decay", "(0, 1]"]),
        (with_default({"variant": "linear", "decay": 1.5}), ["attention.default.decay", "(0, 1]"]),
        (with_default({"variant": "linear", "normalize": "yes"}), ["attention.default.normalize", "true or false"]),
        (with_default({"variant": "linear", "eps": "1e-6"}), ["attention.default.eps", "got str '1e-6'"]),
        (with_default({"variant": "linear", "eps": -1.0}), ["attention.default.eps", ">= 0"]),
        (with_default({"variant": "sparse", "window": "1024"}), ["attention.default.window", "an integer"]),
        (with_default({"variant": "sparse", "window": True}), ["attention.default.window", "got bool True"]),
        (with_default({"variant": "sparse", "window": 2.0}), ["attention.default.window", "an integer"]),
        (with_default({"variant": "sparse", "window": 0}), ["attention.default.window", ">= 1"]),
        (with_default({"variant": "sparse", "sinks": -1}), ["attention.default.sinks", ">= 0"]),
        (with_default({"variant": "sparse", "pattern": "power", "block": 0}), ["attention.default.block", ">= 1"]),
        (with_default({"variant": "sparse", "window_blocks": 0}), ["attention.default.window_blocks", ">= 1"]),
        (with_default({"variant": "sparse", "pattern": "slidingwindow"}),
         ["attention.default.pattern", "did you mean 'sliding_window'?", "Valid: sliding_window, power, block"]),
        (with_default({"variant": "sparse", "pattern": "block"}), ["attention.default.mask", "requires a mask"]),
        (with_default({"variant": "sparse", "mask": "m:f"}), ["attention.default.mask", "only pattern 'block'"]),
        (with_default({"variant": "sparse", "pattern": "block", "mask": "m.f"}),
         ["attention.default.mask", "'module:function'"]),
        (with_default({"variant": "softmax", "kernel": "cdnn"}),
         ["attention.default.kernel", "did you mean 'cudnn'?", "Valid: auto, attncc, cudnn, flash"]),
        (with_default({"variant": "sqa", "kernel": "fa2"}), ["attention.default.kernel", "Valid: auto, attncc, cudnn, flash"]),
        (with_default({"variant": "softplus", "reweight_p": -1}), ["attention.default.reweight_p", ">= 0"]),
        (with_default({"variant": "softplus", "reweight_p": float("inf")}),
         ["attention.default.reweight_p", "finite number"]),
        (with_default({"variant": "mala", "sim_scale": 0}), ["attention.default.sim_scale", "> 0"]),
        (with_default({"variant": "sqa", "query_heads": 0}), ["attention.default.query_heads", ">= 1"]),
        (with_default({"variant": "sqa", "kv_heads": "2"}), ["attention.default.kv_heads", "an integer or null"]),
        (with_default({"variant": "sqa", "init": "avg"}), ["attention.default.init", "Valid: mean, select"]),
        (with_default({"feature_map": "relu"}), ["attention.default", "missing key 'variant'"]),
        (with_default(3), ["attention.default", "expected a variant name"]),
        (rule({"layers": "3-1"}), ["attention.rules[1].where.layers", "'3-1'", "start 3 > end 1"]),
        (rule({"layers": "a-b"}), ["attention.rules[1].where.layers", "'a-b'", "'N', 'N-M' or 'N-'"]),
        (rule({"layers": [0, "x"]}), ["attention.rules[1].where.layers[1]", "'x'"]),
        (rule({"layers": -1}), ["attention.rules[1].where.layers", "must be >= 0"]),
        (rule({"layers": True}), ["attention.rules[1].where.layers", "got bool True"]),
        (rule({"layers": []}), ["attention.rules[1].where.layers", "empty list"]),
        (rule({"modul": "x"}), ["attention.rules[1].where", "unknown key 'modul'", "did you mean 'module'?",
                                "Valid: layers, module"]),
        (rule({"module": ""}), ["attention.rules[1].where.module", "non-empty"]),
        (rule("0-1"), ["attention.rules[1].where", "expected a mapping"]),
        ({"attention": {"rules": [{"where": {"layers": 0}}]}}, ["attention.rules[0]", "missing key 'use'"]),
        ({"attention": {"rules": [{"where": {}, "use": "keep", "when": 1}]}},
         ["attention.rules[0]", "unknown key 'when'", "did you mean 'where'?"]),
        ({"attention": {"rules": {"where": {}}}}, ["attention.rules", "expected a list"]),
        ({"attention": {"defualt": "keep"}}, ["attention", "unknown key 'defualt'", "did you mean 'default'?"]),
        ({"attention": "liner"}, ["attention", "unknown variant 'liner'", "did you mean 'linear'?"]),
        ({"atention": {}}, ["unknown key 'atention'", "did you mean 'attention'?",
                            "Valid: version, name, target, attention, residual"]),
        ({"source": "x"}, ["unknown key 'source'"]),
        ({"version": 2}, ["version", "unsupported version 2", "supported: 1"]),
        ({"version": 2, "future_key": 1}, ["unsupported version 2"]),
        ({"version": "1"}, ["version", "unsupported version '1'"]),
        ({"name": ""}, ["name", "non-empty string"]),
        ({"target": {"dtype": "bfloat16", "max_seq_len": 0}}, ["target.max_seq_len", ">= 1"]),
        ({"target": {"devise": "cuda"}}, ["target", "did you mean 'device'?", "Valid: device, dtype, max_seq_len"]),
        ({"residual": "attnre"}, ["residual", "did you mean 'attnres'?", "Valid: keep, attnres"]),
        ({"residual": {"use": "linear"}}, ["residual.use", "unknown variant 'linear'", "Valid: keep, attnres"]),
        ({"residual": {"uses": "keep"}}, ["residual", "unknown key 'uses'", "did you mean 'use'?"]),
        ({"residual": {"variant": "attnres", "block_size": 0}}, ["residual.block_size", ">= 1"]),
        ({"residual": {"variant": "attnres", "blocksize": 2}}, ["residual", "did you mean 'block_size'?"]),
    ],
)
def test_errors(data, fragments):
    with pytest.raises(PolicyError) as info:
        load_policy(data)
    message = str(info.value)
    assert message.startswith("<dict>: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "build, fragments",
    [
        (lambda: Linear(feature_map="elu"), ["feature_map", "did you mean 'elu1'?"]),
        (lambda: Sparse(window=0), ["window", ">= 1"]),
        (lambda: Where(layers="5-2"), ["layers", "start 5 > end 2"]),
        (lambda: Rule(Where(), "liner"), ["use", "did you mean 'linear'?"]),
        (lambda: Rule(Where(), AttnRes()), ["use", "AttnRes is not allowed here"]),
        (lambda: AttentionPolicy(rules=[{"where": {"layers": "x"}, "use": "keep"}]), ["rules[0].where.layers"]),
        (lambda: Target(max_seq_len=True), ["max_seq_len", "got bool True"]),
        (lambda: Policy(version=3), ["version", "unsupported version 3"]),
        (lambda: Policy(residual=Keep()), ["residual", "Keep is not allowed here"]),
        (lambda: Policy(attention="sqa", source="mine.py"), []),
        (lambda: Policy(attention={"default": "sqaa"}, source="mine.py"), ["mine.py: attention.default"]),
    ],
)
def test_python_construction_is_validated(build, fragments):
    if not fragments:
        assert build().attention.default == SQA()
        return
    with pytest.raises(PolicyError) as info:
        build()
    for fragment in fragments:
        assert fragment in str(info.value)


def test_policies_are_frozen_and_hashable():
    policy = load_policy(EVERY_VARIANT)
    with pytest.raises(AttributeError):
        policy.name = "x"  # type: ignore[misc]
    assert hash(policy) == hash(load_policy(policy.to_dict()))


@pytest.mark.parametrize(
    "filename, content, fragments",
    [
        ("policy.txt", "", ["policy.txt: ", "unknown file suffix '.txt'", "Valid: .yaml, .yml, .toml, .json"]),
        ("missing.yaml", None, ["missing.yaml: file not found"]),
        ("bad.yaml", "attention: [unclosed", ["bad.yaml: cannot parse YAML"]),
        ("bad.toml", "version = ", ["bad.toml: cannot parse TOML"]),
        ("bad.json", "{", ["bad.json: cannot parse JSON"]),
        ("list.yaml", "- 1\n", ["list.yaml: expected a mapping at the top level"]),
        ("empty.yml", "", ["empty.yml: expected a mapping at the top level, got NoneType"]),
        ("policy.yaml", "attention:\n  rules:\n    - {where: {layers: 0}, use: keep}\n    - {where: {}, use: liner}\n",
         ["policy.yaml: attention.rules[1].use: unknown variant 'liner'; did you mean 'linear'?"]),
        ("policy.toml", 'version = 1\n[attention]\ndefault = {variant = "linear", feature_mpa = "relu"}\n',
         ["policy.toml: attention.default: unknown parameter 'feature_mpa'", "did you mean 'feature_map'?"]),
        ("policy.json", json.dumps({"version": 7}), ["policy.json: version: unsupported version 7"]),
    ],
)
def test_file_errors(tmp_path, filename, content, fragments):
    path = tmp_path / filename
    if content is not None:
        path.write_text(content)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(str(path))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_dump_rejects_unknown_suffix(tmp_path):
    with pytest.raises(PolicyError, match="unknown file suffix '.yamll'"):
        dump_policy(Policy(), tmp_path / "p.yamll")


def test_load_rejects_other_types():
    with pytest.raises(PolicyError, match="expected a path, a dict or a Policy"):
        load_policy(42)  # type: ignore[arg-type]


def test_load_mask():
    allowed = ["os", "no_such_module_xyz"]
    assert Sparse(pattern="block", mask="os.path:join").load_mask(allowed) is os.path.join
    with pytest.raises(PolicyError, match="cannot load mask 'no_such_module_xyz:f'.*ModuleNotFoundError"):
        Sparse(pattern="block", mask="no_such_module_xyz:f").load_mask(allowed)
    with pytest.raises(PolicyError, match="cannot load mask 'os.path:nope'.*AttributeError"):
        Sparse(pattern="block", mask="os.path:nope").load_mask(allowed)
    with pytest.raises(PolicyError, match="not callable"):
        Sparse(pattern="block", mask="os:sep").load_mask(allowed)
    with pytest.raises(PolicyError, match="no mask"):
        Sparse().load_mask(allowed)
    with pytest.raises(PolicyError, match="would import module 'os.path', which is not allowed"):
        Sparse(pattern="block", mask="os.path:join").load_mask(["os.pa"])


def test_yaml_file_form_matches_canonical_dict(tmp_path):
    policy = load_policy(EVERY_VARIANT)
    dump_policy(policy, tmp_path / "p.yaml")
    assert yaml.safe_load((tmp_path / "p.yaml").read_text()) == policy.to_dict()


SITES = [(f"model.layers.{i}.self_attn", i) for i in range(12)]


@pytest.mark.parametrize(
    "rules",
    [
        [],
        [{"where": {"layers": "0-11"}, "use": "keep"}],
        [{"where": {"layers": "11-"}, "use": "keep"}, {"where": {"module": "*.self_attn"}, "use": "mala"}],
    ],
)
def test_check_sites_ok(rules):
    check_sites(load_policy({"attention": {"rules": rules}}), SITES, num_layers=12)


@pytest.mark.parametrize(
    "rules, fragments",
    [
        ([{"where": {"layers": 0}, "use": "keep"}, {"where": {"layers": 3}, "use": "keep"},
          {"where": {"layers": "10-40"}, "use": "keep"}],
         ["attention.rules[2].where.layers: layer 40 is outside the model (layers 0-11)"]),
        ([{"where": {"layers": "20-"}, "use": "keep"}], ["rules[0].where.layers: layer 20 is outside"]),
        ([{"where": {"layers": [1, 12]}, "use": "keep"}], ["rules[0].where.layers: layer 12 is outside"]),
        ([{"where": {"layers": 0}, "use": "keep"}, {"where": {"module": "*.cross_attn"}, "use": "keep"}],
         ["attention.rules[1]: matches no attention site; modules seen: model.layers.0.self_attn, "
          "model.layers.1.self_attn", "(4 more)"]),
        ([{"where": {"layers": 0, "module": "*.mlp"}, "use": "keep"}], ["rules[0]: matches no attention site"]),
    ],
)
def test_check_sites_errors(rules, fragments):
    policy = load_policy({"attention": {"rules": rules}})
    with pytest.raises(PolicyError) as info:
        check_sites(policy, SITES, num_layers=12)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_check_sites_names_the_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"attention": {"rules": [{"where": {"layers": 40}, "use": "keep"}]}}))
    with pytest.raises(PolicyError, match=r"^.*p\.json: attention\.rules\[0\]\.where\.layers: layer 40"):
        check_sites(load_policy(path), SITES, num_layers=12)
