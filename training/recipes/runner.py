"""One runner for every recipe: a recipe is a configuration (name, sizes, named stages), not a program.

Why: each shipped model used to re-implement the whole sequence (data, training, export, scoring,
node parity, latency, card) in one long function; the stages were the same in name and different
in detail, and none could be resumed or skipped except the evidence stage, by hand.  Here a recipe
lists its :class:`Stage` s; :func:`run_recipe` runs them in that order and

* records each finished stage's results in ``<work_dir>/recipe-state.json`` (JSON; written after
  every stage), so ``resume=True`` skips stages that finished in an earlier run of the same recipe,
  size and seed offset, and hands their recorded results to the later stages;
* never records stages marked ``persist=False`` (numpy arrays rendered from seeds: deterministic
  and cheaper to redo than to store): they run when, and only if, a stage that runs needs them;
* runs only the stages named in ``only`` or all but those in ``skip`` (e.g. ``only=("evidence",)``
  re-scores a built model without training), and refuses names the recipe does not have.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "recipe-state.json"


class RecipeError(RuntimeError):
    """A recipe run that cannot proceed (unknown stage, missing prerequisite, state of another run)."""


@dataclass(frozen=True)
class Stage:
    """One named step.  ``run`` returns its results (JSON-serialisable when ``persist``) or None."""

    name: str
    run: Callable[[RecipeRun], Any]
    needs: tuple[str, ...] = ()
    persist: bool = True
    description: str = ""


@dataclass(frozen=True)
class RecipeConfig:
    """What a recipe is: the model it builds, its sizes (e.g. ``full`` / ``tiny``) and its stages."""

    name: str
    version: str
    description: str
    sizes: Mapping[str, Any]
    stages: tuple[Stage, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe {self.name}: stage names must be unique, got {names}")
        for i, s in enumerate(self.stages):
            early = set(names[:i])
            missing = [n for n in s.needs if n not in early]
            if missing:
                raise ValueError(f"recipe {self.name}: stage {s.name!r} needs {missing}, which do not run before it")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise RecipeError(f"recipe {self.name} has no stage {name!r}; stages: {', '.join(self.stage_names)}")


@dataclass
class RecipeRun:
    """One run of a recipe: where it writes, its size and seed, and every stage's results so far."""

    recipe: RecipeConfig
    out_root: Path
    work_dir: Path
    size_name: str = "full"
    seed_offset: int = 0
    workers: int = 1
    threads: int = 2
    command: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)

    @property
    def model_dir(self) -> Path:
        return self.out_root / self.recipe.name

    @property
    def size(self) -> Any:
        try:
            return self.recipe.sizes[self.size_name]
        except KeyError:
            raise RecipeError(f"recipe {self.recipe.name} has no size {self.size_name!r}; "
                              f"sizes: {', '.join(self.recipe.sizes)}") from None

    @property
    def tiny(self) -> bool:
        return self.size_name == "tiny"

    def get(self, stage: str) -> Any:
        """The results of ``stage`` (this run's, or recorded by the run this one resumes)."""
        if stage not in self.results:
            raise RecipeError(f"recipe {self.recipe.name}: results of stage {stage!r} are not available")
        return self.results[stage]

    def identity(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, "version": self.recipe.version, "size": self.size_name,
                "seed_offset": self.seed_offset}


def _state_path(run: RecipeRun) -> Path:
    return run.work_dir / STATE_FILE


def _load_state(run: RecipeRun) -> dict[str, Any]:
    path = _state_path(run)
    if not path.exists():
        return {}
    state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if state.get("identity") != run.identity():
        raise RecipeError(f"{path} records a run of {state.get('identity')}, not {run.identity()}: "
                          "resume in the work directory of the same recipe, size and seed offset")
    return state


def _save_state(run: RecipeRun, done: Mapping[str, Any]) -> None:
    from training.evaluate import json_default

    path = _state_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"identity": run.identity(), "done": done, "seconds": run.seconds},
                              default=json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _as_recorded(value: Any) -> Any:
    """The value a resumed run will see: the JSON round trip of what the stage returned."""
    from training.evaluate import json_default

    return json.loads(json.dumps(value, default=json_default))


def run_recipe(run: RecipeRun, *, only: Sequence[str] | None = None, skip: Sequence[str] = (),
               resume: bool = False, rerun: Sequence[str] = ()) -> RecipeRun:
    """Run ``run.recipe``'s stages in order (see module docstring); returns ``run`` with its results.

    ``rerun``: with ``resume``, run these stages again although recorded (e.g. evaluation after a
    change to it, without retraining); the stages after them see the new results."""
    recipe = run.recipe
    for name in [*(only or ()), *skip, *rerun]:
        recipe.stage(name)  # refuses an unknown name with the list of stages
    selected = [n for n in recipe.stage_names if (only is None or n in only) and n not in skip]
    state = _load_state(run) if resume else {}
    done: dict[str, Any] = {k: v for k, v in state.get("done", {}).items() if k not in rerun}
    run.seconds.update(state.get("seconds", {}))
    run.results.update({k: v for k, v in done.items() if k in recipe.stage_names})
    if not resume and _state_path(run).exists():
        _state_path(run).unlink()

    def ensure(name: str, wanted_by: str) -> None:
        if name in run.results:
            return
        stage = recipe.stage(name)
        if name in done:
            run.results[name] = done[name]
        elif not stage.persist:
            log.info("%s: computing unrecorded stage %s (needed by %s)", recipe.name, name, wanted_by)
            execute(stage)
        else:
            raise RecipeError(f"recipe {recipe.name}: stage {wanted_by!r} needs the results of {name!r}, which has "
                              "not run in this work directory; run it first (or resume a run that did)")

    def execute(stage: Stage) -> None:
        for need in stage.needs:
            ensure(need, stage.name)
        log.info("%s: stage %s", recipe.name, stage.name)
        t0 = time.perf_counter()
        value = stage.run(run)
        run.seconds[f"{stage.name}_seconds"] = time.perf_counter() - t0
        run.ran.append(stage.name)
        if stage.persist:  # this run sees exactly what a resumed run would read back
            done[stage.name] = run.results[stage.name] = _as_recorded(value)
            _save_state(run, done)
        else:
            run.results[stage.name] = value

    t_start = time.perf_counter()
    for name in selected:
        stage = recipe.stage(name)
        if resume and name in done and stage.persist:
            run.results[name] = done[name]
            log.info("%s: stage %s already done (%s), skipped", recipe.name, name, _state_path(run))
            continue
        if not stage.persist and not (only and name in only):
            continue  # computed when (and only if) a stage that runs needs it, just before that stage
        if name not in run.results:
            execute(stage)
    run.seconds["total_seconds"] = time.perf_counter() - t_start
    return run


__all__ = ["STATE_FILE", "RecipeConfig", "RecipeError", "RecipeRun", "Stage", "run_recipe"]
