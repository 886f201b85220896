"""Sharding plans given badly: every mistake is a PlanError (a ConfigError) naming the plan, file or argument and
what would be valid; nothing raw (TypeError, UnicodeDecodeError, TOMLDecodeError) escapes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import llama32_jax as lj
from llama32_jax import sharding
from llama32_jax.errors import ConfigError
from llama32_jax.sharding import PlanError


def _write(tmp_path, text: str | bytes, name: str = "plan.toml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _mesh_table(shape: str, axes: str = '["x"]', extra: str = "") -> str:
    return f"[mesh]\nshape = {shape}\naxes = {axes}\n{extra}"


def test_plan_error_is_a_config_error():
    assert issubclass(PlanError, ConfigError) and issubclass(PlanError, ValueError)


@pytest.mark.parametrize(
    ("shape", "axes", "match"),
    [
        ("[true]", '["x"]', r"mesh.shape\[0\] = True, a bool"),
        ("[2, false]", '["x", "y"]', r"mesh.shape\[1\] = False, a bool"),
        ("[-2]", '["x"]', r"mesh.shape\[0\] = -2"),
        ("[0]", '["x"]', r"mesh.shape\[0\] = 0"),
        ("[2.0]", '["x"]', r"mesh.shape\[0\] = 2.0, a float"),
        ('["8"]', '["x"]', r"mesh.shape\[0\] = '8', a str"),
        ("[]", '["x"]', r"non-empty list of positive integers, got \[\]"),
        ("8", '["x"]', r"non-empty list of positive integers, got 8"),
        ("[8]", "[1]", r"mesh.axes must name each of the 1 mesh dimensions with a non-empty string, got \[1\]"),
        ("[8]", '[""]', r"non-empty string"),
        ("[2, 4]", '["x"]', r"must name each of the 2 mesh dimensions"),
        ("[2, 4]", '["x", "x"]', r"mesh.axes \['x', 'x'\] repeats a name"),
    ],
)
def test_bad_mesh_shape_or_axes_in_a_file(tmp_path, shape, axes, match):
    path = _write(tmp_path, _mesh_table(shape, axes))
    with pytest.raises(PlanError, match=match) as info:
        sharding.load_plan(path)
    assert str(path) in str(info.value) and "sharding plan 'plan'" in str(info.value)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ("hosts = true", "mesh.hosts must be a positive divisor of the mesh size, got True"),
        ("hosts = 0", "mesh.hosts must be a positive divisor"),
        ("devices = 8", "mesh.devices must be a device kind string"),
        ("colour = 'red'", r"unknown \[mesh\] keys \['colour'\]; valid: shape, axes, devices, hosts"),
        ("[extra]\na = 1", r"unknown top-level tables \['extra'\]"),
        ("[rules]\nheads = 'x'", "rule for unknown logical axis 'heads'"),
        ("[rules]\nmlp = 3", "rule mlp must be a mesh axis name or a list of them, got 3"),
        ("[rules]\nmlp = ['x', 'x']", r"rule mlp = \['x', 'x'\] repeats a mesh axis"),
        ("[rules]\nmlp = 'y'", r"names \['y'\], not axes of the mesh \['x'\]"),
    ],
)
def test_bad_keys_and_rules_in_a_file(tmp_path, extra, match):
    path = _write(tmp_path, _mesh_table("[8]", extra=extra))
    with pytest.raises(PlanError, match=match):
        sharding.load_plan(path)


def test_plan_from_dict_refuses_a_non_table_and_accepts_tuples():
    with pytest.raises(
        PlanError, match="sharding plan 'x': a plan is a table with \\[mesh\\] and \\[rules\\], got list"
    ):
        sharding.plan_from_dict([1, 2], "x")
    plan = sharding.plan_from_dict({"mesh": {"shape": (2, np.int64(4)), "axes": ("a", "b")}}, "t")
    assert plan.mesh_shape == (2, 4) and type(plan.mesh_shape[1]) is int


def test_non_utf8_file(tmp_path):
    path = _write(tmp_path, b'[mesh]\nshape = [8]\naxes = ["\xff"]\n')
    with pytest.raises(PlanError, match=r"is not UTF-8 text \(byte 0xff on line 3, offset 28\); a plan is a TOML file"):
        sharding.load_plan(path)


def test_invalid_toml_names_the_file_and_the_line(tmp_path):
    path = _write(tmp_path, _mesh_table("[8]", extra="\n[rules\n"))
    with pytest.raises(PlanError, match=r"plan.toml' is not valid TOML: .*\(at line 5, column 7\)"):
        sharding.load_plan(path)


def test_directory_named_like_a_plan_is_called_a_directory(tmp_path):
    (tmp_path / "x.toml").mkdir()
    with pytest.raises(PlanError, match=r"x.toml' is a directory, not a .toml plan file"):
        sharding.load_plan(tmp_path / "x.toml")


def test_missing_file_lists_the_named_plans(tmp_path):
    with pytest.raises(PlanError, match=r"missing.toml' does not exist; named plans available: \[.*'fsdp_tp'"):
        sharding.load_plan(tmp_path / "missing.toml")


def test_unknown_name_and_non_toml_file(tmp_path):
    with pytest.raises(PlanError, match=r"no sharding plan named 'nope'; available: \[.*'tp'.*\] \(or a .toml path\)"):
        sharding.load_plan("nope")
    other = _write(tmp_path, _mesh_table("[8]"), name="plan.txt")
    with pytest.raises(PlanError, match=r"a plan file's name must end in .toml"):
        sharding.load_plan(other)
    with pytest.raises(PlanError, match="plan is an empty string; valid: a plan name"):
        sharding.load_plan("")


@pytest.mark.parametrize("bad", [123, 1.5, None, b"tp", ["tp"], {"mesh": {}}])
def test_wrong_type_of_plan(bad):
    with pytest.raises(PlanError, match=r"plan must be a plan name in sharding/ \(one of \[.*\]\), a .toml path or a"):
        sharding.load_plan(bad)


@pytest.mark.parametrize("bad", [123, 2.5, ["tp"], object()])
def test_resolve_names_the_mesh_argument_and_every_valid_kind(bad):
    with pytest.raises(
        PlanError, match=r"mesh must be a plan name in sharding/ .*, a sharding.Plan or a jax.sharding.Mesh"
    ):
        sharding.resolve(bad)


def test_lj_load_with_a_bad_mesh_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match=r"^mesh must be .* or a jax.sharding.Mesh; got int 123$"):
        lj.load(tmp_path, mesh=123)


def test_plan_larger_than_the_devices():
    plan = sharding.plan_from_dict({"mesh": {"shape": [4], "axes": ["data"]}}, "four")
    with pytest.raises(
        PlanError, match=r"sharding plan 'four' needs 4 devices \(mesh \{'data': 4\}\) but 1 are available"
    ):
        sharding.make_mesh(plan, jax.devices()[:1])
    with pytest.raises(PlanError, match="devices must be a sequence of jax devices, got int"):
        sharding.make_mesh(plan, 4)


def test_shard_model_refuses_a_mesh_of_the_wrong_type():
    from llama32_jax import configs
    from llama32_jax.models.build import abstract_model

    with pytest.raises(PlanError, match="mesh must be a jax.sharding.Mesh or None .*got str"):
        sharding.shard_model(abstract_model(configs.TINY_TEXT), "single", mesh="single")


def test_load_plan_refuses_a_mesh():
    mesh = Mesh(np.asarray(jax.devices()[:1], dtype=object).reshape(1), ("data",))
    with pytest.raises(PlanError, match="load_plan takes a plan, not a jax Mesh; pass the Mesh to sharding.resolve"):
        sharding.load_plan(mesh)
    assert sharding.resolve(mesh)[0].mesh_dict == {"data": 1}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"coordinator_address": "10.0.0.1"}, r"coordinator_address must be a 'host:port' string .*got '10.0.0.1'"),
        ({"coordinator_address": ":1234"}, "coordinator_address must be a 'host:port' string"),
        ({"coordinator_address": "host:99999"}, "coordinator_address must be a 'host:port' string"),
        ({"coordinator_address": 1234}, "coordinator_address must be a 'host:port' string"),
        ({"num_processes": 0}, "num_processes must be an int >= 1, got 0"),
        ({"num_processes": 2.0}, "num_processes must be an int >= 1, got 2.0"),
        ({"num_processes": 2, "process_id": 2}, r"process_id must be an int in \[0, num_processes=2\), got 2"),
        ({"process_id": -1}, "process_id must be an int >= 0, got -1"),
        ({"process_id": True}, "process_id must be an int"),
    ],
)
def test_distributed_initialize_argument_errors(kwargs, match):
    from llama32_jax.errors import InvalidInputError
    from llama32_jax.sharding import distributed

    with pytest.raises(InvalidInputError, match=match):  # refused before jax.distributed is touched
        distributed.initialize(**kwargs)
