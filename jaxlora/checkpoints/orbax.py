"""Train-state checkpoints with Orbax: save every `save_interval` steps, resume exactly.

Layout: `<out_dir>/checkpoints/<step>/` per optimizer step, with the items
  lora       LoRA params (the train state's plain dict, fp32)
  opt_state  optimizer state
  rng        the run's base dropout key
  meta       JSON: step, data position {epoch, index, seed}, val loss of that step
  config     JSON: the resolved run config

Orbax writes a step into a temporary directory, puts `commit_success.txt` in it, then renames
it to `<step>`: a crash mid-save leaves only a `*.orbax-checkpoint-tmp-*` directory, which is
never listed as a step. Restoring without an explicit step takes the newest step that has its
commit marker and restores cleanly; a broken newer step is skipped with a warning and moved
aside to `<step>.corrupt` (so the resumed run can save that step again).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxlora import storage
from jaxlora.errors import CheckpointError
from jaxlora.training.step import TrainState

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMMIT_MARKER = "commit_success.txt"
ITEMS = ("lora", "opt_state", "rng", "meta", "config")


@dataclasses.dataclass
class Restored:
    step: int
    state: TrainState
    rng: jax.Array
    data_position: dict | None
    val_loss: float | None
    config: dict | None


def abstract_state(state: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of `state`: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class CheckpointManager:
    """Orbax CheckpointManager over `<out_dir>/checkpoints`.

    max_to_keep: how many of the newest steps to keep (None: all).
    keep_best: also keep this many steps with the lowest val loss (steps saved without one count
      only as newest). Ignored when max_to_keep is None (everything is kept).
    async_save: write in a background thread; the train state is copied off first, so the next
      (donating) train step may run at once. Call `wait_until_finished()` before the process exits.
    """

    def __init__(self, out_dir: str | os.PathLike, *, max_to_keep: int | None = None, keep_best: int = 0,
                 async_save: bool = True, read_only: bool = False):
        self.directory = storage.as_path(out_dir) / CHECKPOINTS_DIR
        policies = [checkpoint_managers.LatestN(n=max_to_keep)]
        if keep_best and max_to_keep is not None:
            policies.append(checkpoint_managers.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True,
                                                      n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of saves a crash interrupted
            preservation_policy=None if read_only else checkpoint_managers.AnyPreservationPolicy(policies))
        self.read_only = read_only
        self._mgr = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, state: TrainState, *, rng: jax.Array, data_position: dict | None, val_loss: float | None,
             config: dict | None) -> bool:
        """Save `state` under its step; False (nothing written) if that step is already saved."""
        step = int(jax.device_get(state.step))
        if step in self._mgr.all_steps():
            return False
        meta = {"step": step, "data_position": _jsonable(data_position),
                "val_loss": None if val_loss is None else float(val_loss)}
        args = ocp.args.Composite(
            lora=ocp.args.StandardSave(state.lora), opt_state=ocp.args.StandardSave(state.opt_state),
            rng=ocp.args.JaxRandomKeySave(rng), meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(config or {}))
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        try:  # also reports a failure of the previous (asynchronous) save
            return self._mgr.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - a full disk surfaces as OSError or as tensorstore's errors
            raise self._save_failed(e) from e

    def restore(self, target: TrainState, step: int | None = None) -> Restored | None:
        """Restore onto `target` (a train state or its `abstract_state`; shardings are taken from it).

        step None: the newest usable step, skipping broken ones (None if there is no step at all).
        An explicit step must exist and restore cleanly, else CheckpointError.
        """
        target = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
                              else ocp.utils.to_shape_dtype_struct(x), target)
        if step is not None:
            if step not in self._mgr.all_steps() or not self._complete(step):
                raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory}")
            try:
                return self._restore(target, step)
            except Exception as e:  # noqa: BLE001 - any read failure means an unusable checkpoint
                raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be restored: "
                                      f"{type(e).__name__}: {_first_line(e)}") from e
        steps = self.all_steps()
        failure = None
        for candidate in reversed(steps):
            try:
                if not self._complete(candidate):
                    raise CheckpointError(f"it has no {COMMIT_MARKER} or lacks an item")
                return self._restore(target, candidate)
            except Exception as e:  # noqa: BLE001 - skip any unreadable step, fall back to an older one
                failure = f"step {candidate}: {type(e).__name__}: {_first_line(e)}"
                log.warning("skipping checkpoint step %d in %s (%s)%s", candidate, self.directory, failure,
                            "" if self.read_only else f"; moved aside to {candidate}.corrupt")
                self._set_aside(candidate)
        if failure is not None:
            raise CheckpointError(f"no usable checkpoint in {self.directory}; the last failure was {failure}")
        return None

    def saved_config(self, step: int | None = None) -> dict | None:
        """The run config saved with `step` (None: the newest complete step); None when there is none."""
        steps = [step] if step is not None else [s for s in reversed(self.all_steps()) if self._complete(s)]
        for candidate in steps:
            try:
                config = self._mgr.restore(candidate, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            except Exception:  # noqa: BLE001 - unreadable: `restore` reports it (or falls back)
                continue
            return config or None
        return None

    def wait_until_finished(self) -> None:
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - see `save`
            raise self._save_failed(e) from e

    def _save_failed(self, e: Exception) -> CheckpointError:
        complete = [s for s in self.all_steps() if self._complete(s)]
        kept = (f"the newest complete step, {complete[-1]}, is intact and --config.resume=auto continues from it"
                if complete else "no step was saved before it")
        code = re.search(r"os_error_code='(\d+)'", str(e))  # tensorstore's wording of an OSError
        reason = (os.strerror(int(code[1])) if code else e.strerror if isinstance(e, OSError) and e.strerror
                  else f"{type(e).__name__}: {_first_line(e)}")
        return CheckpointError(f"saving a checkpoint in {self.directory} failed ({reason}); {kept} (free disk space "
                               "first)")

    def close(self) -> None:
        self._mgr.close()

    def _complete(self, step: int) -> bool:
        step_dir = self.directory / str(step)
        return (step_dir / COMMIT_MARKER).is_file() and all((step_dir / item).is_dir() for item in ITEMS)

    def _restore(self, target: TrainState, step: int) -> Restored:
        args = ocp.args.Composite(
            lora=ocp.args.StandardRestore(target.lora), opt_state=ocp.args.StandardRestore(target.opt_state),
            # The key is replicated like the step counter.
            rng=ocp.args.JaxRandomKeyRestore(ocp.ArrayRestoreArgs(sharding=target.step.sharding)),
            meta=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
        r = self._mgr.restore(step, args=args)
        meta = r["meta"]
        if meta.get("step") != step:
            raise CheckpointError(f"its metadata names step {meta.get('step')}")
        step_array = jax.device_put(np.asarray(step, np.int32), target.step.sharding)
        state = TrainState(step=step_array, lora=r["lora"], opt_state=r["opt_state"])
        return Restored(step=step, state=state, rng=r["rng"], data_position=meta.get("data_position"),
                        val_loss=meta.get("val_loss"), config=r["config"] or None)

    def _set_aside(self, step: int) -> None:
        if self.read_only:
            return
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = src.with_name(f"{step}.corrupt")
            n = 1
            while dst.exists():
                dst, n = src.with_name(f"{step}.corrupt{n}"), n + 1
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"jaxlora_set_aside_{step}")
        self._mgr.reload()


def saved_steps(out_dir: str | os.PathLike) -> list[int]:
    """The step numbers of the step directories under `<out_dir>/checkpoints`, complete or not."""
    root = storage.path(out_dir) / CHECKPOINTS_DIR
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def resolve_resume(resume: bool | str | os.PathLike | None,
                   out_dir: str | os.PathLike) -> tuple[storage.AnyPath, int | None] | None:
    """Where to resume from: None (start fresh) or (out_dir holding `checkpoints/`, step or None = newest).

    resume: False/None: start fresh. True: the newest step under `<out_dir>/checkpoints` (error if
    none). "auto": the same, or start fresh if there is none. A path: a step directory
    (`.../checkpoints/<step>`), a `checkpoints` directory, or a run's out_dir; each may be a URL
    (gs://...).
    """
    if resume in (None, False, "", "false", "False"):
        return None
    if resume in (True, "auto", "true", "True"):
        if not saved_steps(out_dir):
            if resume == "auto":
                return None
            raise CheckpointError(f"resume is set but {storage.path(out_dir) / CHECKPOINTS_DIR} holds no checkpoint; use "
                                  "resume='auto' to start fresh")
        return storage.path(out_dir), None
    path = storage.path(resume)
    if path.name.isdigit() and path.parent.name == CHECKPOINTS_DIR:
        if not path.is_dir():
            raise CheckpointError(f"resume checkpoint {path} does not exist")
        return path.parent.parent, int(path.name)
    if path.name == CHECKPOINTS_DIR and path.is_dir():
        return path.parent, None
    if (path / CHECKPOINTS_DIR).is_dir():
        return path, None
    raise CheckpointError(f"resume path {path} is neither a checkpoint step directory (.../{CHECKPOINTS_DIR}/<step>) "
                          f"nor a directory holding {CHECKPOINTS_DIR}/")


def _jsonable(x: Any) -> Any:
    """numpy scalars/arrays in a data position -> plain Python."""
    if x is None:
        return None
    return jax.tree.map(lambda v: v.item() if isinstance(v, np.generic) or getattr(v, "ndim", None) == 0 else v, x)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
