"""Checkpoints of a fine-tuning run: save a :class:`~llama32_jax.training.train.Trainer`'s state, resume it exactly.

A checkpoint directory is an Orbax ``CheckpointManager`` directory: one sub-directory per saved step, each written
to a temporary name and renamed when complete (Orbax's own atomicity, so a run killed mid-save leaves the previous
checkpoint as the latest; its temporary directory is removed by the next run), ``max_to_keep`` of them kept.
Each step holds three items:

- ``state``: the trainable parameters and the optimizer state (Orbax ``StandardSave``). Their pytrees (``nnx.State``,
  optax's named tuples) are stored as plain nested dicts keyed by each leaf's path, e.g.
  ``trainable/layers/0/attention/wq/lora/a/value`` or ``opt_state/1/0/mu/...``;
- ``data``: the data iterator's state (JSON; :func:`llama32_jax.training.data.make_dataset`'s ``get_state()``), so the
  next batch after a resume is the one the interrupted run would have drawn;
- ``run``: the :class:`RunSpec` (JSON): the base model (a path, or a built-in name), the
  :class:`~llama32_jax.training.train.TrainConfig`, the parameter dtype, the layer layout and how the batches are made.

So resuming needs only the directory::

    ckpt = TrainCheckpointer("runs/ft", RunSpec(base_model=path, train_config=cfg, data={...}), save_every=100)
    ckpt.save(trainer, data_iter.get_state())          # saves when step % save_every == 0 (force=True: always)
    ...
    trainer, ckpt, data_state, model = resume("runs/ft")   # base model loaded, adapters/optimizer restored

Restoring is exact: the arrays come back bit for bit, so a fresh trainer built from the same base model and
restored continues with the same losses and parameters as an uninterrupted run. Restore targets are
``jax.ShapeDtypeStruct``\\s carrying the *current* trainer arrays' shardings, so a sharded trainer (built under a
plan) reads each array straight into its shards, whatever plan wrote the checkpoint. A directory written for a
different base model, training configuration or dtype, or whose arrays do not fit the trainer, is refused with a
:class:`~llama32_jax.errors.CheckpointError` naming each mismatch.

Multi-process runs: arrays are saved and restored collectively by Orbax; the JSON items are written by the primary
process, so every process gets the primary's data-iterator state (per-process iterators are not recorded).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llama32_jax.checkpoint.safety import os_errno, short, storage_error, user_path
from llama32_jax.errors import CheckpointError, InvalidInputError
from llama32_jax.training.base_models import BUILTIN_MODELS, load_base_model
from llama32_jax.training.train import TrainConfig, Trainer

__all__ = [
    "RunSpec",
    "TrainCheckpointer",
    "normalize_model_path",
    "read_run",
    "read_state",
    "resume",
]

FORMAT = "llama32_jax-train-state"
FORMAT_VERSION = 1
ITEMS = ("state", "data", "run")
# --------------------------------------------------------------------------------------------- run description


def config_to_json(cfg: TrainConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["lora_targets"] = list(cfg.lora_targets)
    return out


def config_from_json(data: Mapping[str, Any]) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise CheckpointError(f"the stored TrainConfig has fields this llama32_jax does not know: {unknown}")
    values = dict(data)
    if "lora_targets" in values:
        values["lora_targets"] = tuple(values["lora_targets"])
    return TrainConfig(**values)


def normalize_model_path(model: str | os.PathLike) -> str:
    """How a base model is recorded: an existing path made absolute (symlinks resolved), a built-in name as is."""
    if isinstance(model, bytes) or not isinstance(model, str | os.PathLike):
        raise InvalidInputError(f"base_model must be a path or a built-in name, got {type(model).__name__}")
    text = os.fspath(model)
    if text in BUILTIN_MODELS:
        return text
    expanded = os.path.expanduser(text)
    return str(Path(expanded).resolve()) if os.path.exists(expanded) else text


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What a checkpoint belongs to. ``data`` is free-form JSON describing the batches (path, seq_len, batch_size,
    seed ...); it is compared on resume like the rest. ``options`` is free-form JSON a script may keep for its
    resume (e.g. how often it saves); it does not change the results and is not compared."""

    base_model: str
    train_config: TrainConfig
    dtype: str = "float32"
    scan_layers: bool = False
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "base_model", normalize_model_path(self.base_model))
        for name in ("data", "options"):  # JSON-normal (tuples -> lists)
            object.__setattr__(self, name, json.loads(json.dumps(dict(getattr(self, name)))))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "base_model": self.base_model,
            "train_config": config_to_json(self.train_config),
            "dtype": self.dtype,
            "scan_layers": self.scan_layers,
            "data": dict(self.data),
            "options": dict(self.options),
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any], where: str = "checkpoint") -> RunSpec:
        if not isinstance(record, Mapping) or record.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not a {FORMAT} checkpoint (its run record is missing or foreign)")
        if record.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{where} has train-state format version {record.get('version')!r}; this llama32_jax reads "
                f"version {FORMAT_VERSION}"
            )
        try:
            return cls(
                base_model=record["base_model"],
                train_config=config_from_json(record["train_config"]),
                dtype=record.get("dtype", "float32"),
                scan_layers=bool(record.get("scan_layers", False)),
                data=record.get("data", {}),
                options=record.get("options", {}),
            )
        except (KeyError, TypeError, InvalidInputError) as e:
            raise CheckpointError(f"{where}: its run record is invalid: {e}") from e

    def mismatches(self, other: RunSpec) -> list[str]:
        """``"field: checkpoint X, this run Y"`` for every difference (``self`` is the checkpoint's)."""
        out = []

        def diff(name, mine, theirs):
            if mine != theirs:
                out.append(f"{name}: checkpoint {mine!r}, this run {theirs!r}")

        diff("base_model", self.base_model, other.base_model)
        diff("dtype", self.dtype, other.dtype)
        diff("scan_layers", self.scan_layers, other.scan_layers)
        for f in dataclasses.fields(TrainConfig):
            diff(f"train_config.{f.name}", getattr(self.train_config, f.name), getattr(other.train_config, f.name))
        for key in sorted(set(self.data) | set(other.data)):
            diff(f"data.{key}", self.data.get(key), other.data.get(key))
        return out


# --------------------------------------------------------------------------------------------- pytree <-> dict


def _part(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flatten(tree: Any) -> tuple[dict[tuple[str, ...], Any], Any]:
    """``({path: leaf}, treedef)`` with string path parts, in the treedef's leaf order."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat: dict[tuple[str, ...], Any] = {}
    for path, leaf in leaves:
        key = tuple(_part(p) for p in path)
        if key in flat:
            raise CheckpointError(f"two leaves of the training state share the path {'/'.join(key)!r}")
        flat[key] = leaf
    return flat, treedef


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _unnest(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_unnest(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def _arrays(trainer: Trainer) -> dict:
    return {"trainable": trainer.trainable, "opt_state": trainer.opt_state}


def _describe(leaf: Any) -> tuple[tuple[int, ...], str]:
    return tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype))


def _restore_sharding(trainer: Trainer, leaf: Any):
    """Where a restored leaf goes: the current array's sharding. Under a plan, a single-device leaf (the optimizer's
    step counters, created uncommitted by ``tx.init``) is replicated over the plan's mesh instead: a committed
    one-device array could not join the sharded step."""
    placement = getattr(trainer, "placement", None)
    if placement is not None and isinstance(leaf.sharding, jax.sharding.SingleDeviceSharding):
        return placement.replicated()
    return leaf.sharding


# --------------------------------------------------------------------------------------------- the manager


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


class TrainCheckpointer:
    """Save and restore a :class:`~llama32_jax.training.train.Trainer`'s state under ``directory`` (module docstring).

    ``run``: what this run is; if the directory already holds checkpoints, they must belong to the same run (else
    :class:`CheckpointError` naming every mismatch). ``run=None`` takes the run of the latest checkpoint (resume).
    ``save_every``: :meth:`save` writes only when ``step % save_every == 0`` unless forced. ``max_to_keep``: older
    checkpoints are deleted (None keeps all).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        run: RunSpec | None = None,
        *,
        save_every: int = 100,
        max_to_keep: int | None = 3,
    ):
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise InvalidInputError(f"save_every must be an int >= 1, got {save_every!r}")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise InvalidInputError(f"max_to_keep must be None or an int >= 1, got {max_to_keep!r}")
        ocp = _ocp()
        self.directory = user_path(directory, "checkpoint directory")  # relative and ~ paths; Orbax needs absolute
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {str(self.directory)!r} is a file")
        if run is None and not self.directory.is_dir():
            raise CheckpointError(f"{str(self.directory)!r} holds no checkpoint to resume from (it does not exist)")
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,  # temporaries of a run killed mid-save
            enable_async_checkpointing=False,  # save() returns with the step on disk: safe to exit right after
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "run": ocp.JsonCheckpointHandler(),
        }
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except OSError as e:  # e.g. the directory cannot be created (permission denied, read-only, a file above it)
            raise storage_error(e, self.directory, "opening the checkpoint directory") from e
        stored = self.stored_run()
        if run is None:
            if stored is None:
                raise CheckpointError(f"{str(self.directory)!r} holds no checkpoint to resume from")
            run = stored
        elif stored is not None:
            bad = stored.mismatches(run)
            if bad:
                raise CheckpointError(
                    f"{str(self.directory)!r} holds checkpoints of a different run (latest step {self.latest_step()}); "
                    f"mismatched: {'; '.join(bad)}. Use another directory, or the checkpoint's settings."
                )
        self.run = run

    # -- queries
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def stored_run(self, step: int | None = None) -> RunSpec | None:
        """The run record of ``step`` (default: the latest), or None if the directory has no checkpoint."""
        ocp = _ocp()
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        where = f"{str(self.directory)!r} step {step}"
        try:
            record = self._manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise CheckpointError(f"{where}: cannot read its run record: {e}") from e
        return RunSpec.from_json(record, where)

    # -- save / restore
    def save(self, trainer: Trainer, data_state: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Save the trainer's state at ``trainer.steps_done`` (with the data iterator's ``get_state()``); returns
        whether a checkpoint was written (not off the interval, not already there)."""
        ocp = _ocp()
        step = int(trainer.steps_done)
        if step in self._manager.all_steps():
            return False
        if not force and step % self.save_every:
            return False
        flat, _ = _flatten(_arrays(trainer))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_nest(flat)),
            data=ocp.args.JsonSave(dict(data_state) if data_state is not None else {}),
            run=ocp.args.JsonSave(self.run.to_json()),
        )
        try:
            saved = self._manager.save(step, args=args, force=force)
            self._manager.wait_until_finished()
        except Exception as e:  # disk full / quota / read-only: StorageError (TensorStore reports an OS error code)
            if isinstance(e, OSError) or os_errno(e) is not None:
                raise storage_error(e, self.directory, f"saving step {step} under") from e
            raise CheckpointError(f"saving step {step} under {str(self.directory)!r} failed: {short(e)}") from e
        return bool(saved)

    def restore(self, trainer: Trainer, step: int | None = None) -> dict[str, Any] | None:
        """Load ``step`` (default: the latest) into ``trainer`` (its parameters, optimizer state and step count);
        returns the saved data-iterator state (None if none was saved). Arrays land in the shardings of the
        trainer's current arrays."""
        ocp = _ocp()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{str(self.directory)!r} holds no checkpoint to restore")
        if step not in self._manager.all_steps():
            raise CheckpointError(f"{str(self.directory)!r} has no step {step} (steps: {self.all_steps()})")
        where = f"{str(self.directory)!r} step {step}"
        stored = self.stored_run(step)
        bad = stored.mismatches(self.run)
        if bad:
            raise CheckpointError(f"{where} belongs to a different run; mismatched: {'; '.join(bad)}")
        current, treedef = _flatten(_arrays(trainer))
        self._check_arrays(step, current, where)
        target = {
            path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_restore_sharding(trainer, leaf))
            for path, leaf in current.items()
        }
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_nest(target)), data=ocp.args.JsonRestore(), run=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # TensorStore raises bare Exceptions with multi-KB dumps for damaged files
            raise CheckpointError(f"{where}: restoring the training state failed (damaged files?): {short(e)}") from e
        flat = _unnest(restored["state"])
        leaves = [flat[path] for path in current]
        state = jax.tree_util.tree_unflatten(treedef, leaves)
        trainer.restore({"trainable": state["trainable"], "opt_state": state["opt_state"], "step": step})
        data = restored["data"]
        return dict(data) if data else None

    def _check_arrays(self, step: int, current: Mapping[tuple[str, ...], Any], where: str) -> None:
        meta = self._manager.item_metadata(step)
        tree = meta["state"] if meta is not None else None
        if tree is None:
            raise CheckpointError(f"{where} has no training state")
        stored = {path: _describe(m) for path, m in _unnest(tree).items()}
        want = {path: _describe(leaf) for path, leaf in current.items()}

        def order(path):  # parameters before optimizer moments
            return (path[0] != "trainable", path)

        problems = []
        for what, paths in (
            ("in the checkpoint but not in the trainer", set(stored) - set(want)),
            ("in the trainer but not in the checkpoint", set(want) - set(stored)),
        ):
            if paths:
                examples = ", ".join("/".join(p) for p in sorted(paths, key=order)[:3])
                problems.append(f"{len(paths)} array(s) {what}, e.g. {examples}")
        differ = [p for p in sorted(set(want) & set(stored), key=order) if want[p] != stored[p]]
        for path in differ[:5]:
            (ws, wd), (ss, sd) = want[path], stored[path]
            problems.append(f"{'/'.join(path)}: checkpoint {sd}{list(ss)}, trainer {wd}{list(ws)}")
        if len(differ) > 5:
            problems.append(f"... {len(differ) - 5} more arrays differ in shape or dtype")
        if problems:
            raise CheckpointError(f"{where} does not fit this trainer: " + "; ".join(problems))

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- helpers


def read_run(directory: str | os.PathLike) -> RunSpec | None:
    """The run record of the latest checkpoint under ``directory`` (None if it holds no checkpoint)."""
    root = user_path(directory, "checkpoint directory")
    if not root.is_dir():
        return None
    ocp = _ocp()
    manager = ocp.CheckpointManager(
        root,
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"run": ocp.JsonCheckpointHandler()},
    )
    try:
        step = manager.latest_step()
        if step is None:
            return None
        try:
            record = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise CheckpointError(f"{str(directory)!r} step {step}: cannot read its run record: {e}") from e
        return RunSpec.from_json(record, f"{str(directory)!r} step {step}")
    finally:
        manager.close()


def read_state(directory: str | os.PathLike, step: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
    """``(step, {"trainable/...": array})``: a checkpoint's arrays as host numpy arrays keyed by ``/``-joined
    paths, without building a trainer (inspection, tests)."""
    ocp = _ocp()
    with TrainCheckpointer(directory) as ckpt:
        step = ckpt.latest_step() if step is None else step
        meta = _unnest(ckpt._manager.item_metadata(step)["state"])
        replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {p: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated) for p, m in meta.items()}
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_nest(target)))
        flat = _unnest(ckpt._manager.restore(step, args=args)["state"])
    return step, {"/".join(p): np.asarray(v) for p, v in flat.items()}


def resume(
    directory: str | os.PathLike, *, mesh: Any = None, save_every: int = 100, max_to_keep: int | None = 3
) -> tuple[Trainer, TrainCheckpointer, dict[str, Any] | None, Any]:
    """Rebuild a run from its checkpoint directory alone: ``(trainer, checkpointer, data_state, model)``.

    Loads the recorded base model (``mesh``: optionally under a sharding plan; any plan works), builds a
    :class:`~llama32_jax.training.train.Trainer` with the recorded config and restores the latest checkpoint into it.
    ``model`` is the loaded ``llama32_jax.Model`` (its tokenizer; ``trainer.model`` is the trained module).
    """
    ckpt = TrainCheckpointer(directory, save_every=save_every, max_to_keep=max_to_keep)
    run = ckpt.run
    model = load_base_model(run.base_model, dtype=run.dtype, mesh=mesh, scan_layers=run.scan_layers)
    trainer = Trainer(model.module, run.train_config)
    data_state = ckpt.restore(trainer)
    return trainer, ckpt, data_state, model
