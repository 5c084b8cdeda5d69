"""The one recipe runner (training.recipes.runner): stages run in the recipe's order, resume, only/skip.

Uses a toy recipe of plain-Python stages so each promise is checked in milliseconds; the shipped
recipes (``default_models.RECIPE``, ``model_3d.RECIPE_3D``) are checked to be configurations on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from training.recipes.runner import STATE_FILE, RecipeConfig, RecipeError, RecipeRun, Stage, run_recipe


def _toy(calls: list[str], fail_at: str | None = None) -> RecipeConfig:
    def stage(name: str, value: Any) -> Stage:
        def fn(run: RecipeRun) -> Any:
            calls.append(name)
            if name == fail_at:
                raise RuntimeError(f"boom in {name}")
            return value(run) if callable(value) else value
        return Stage(name, fn)

    data = Stage("data", lambda run: calls.append("data") or {"x": [1, 2, 3]}, persist=False)
    return RecipeConfig(
        name="toy", version="1", description="toy", sizes={"full": {"n": 3}, "tiny": {"n": 1}},
        stages=(
            data,
            Stage("train", stage("train", lambda run: {"w": sum(run.get("data")["x"])}).run, needs=("data",)),
            Stage("evaluate", stage("evaluate", lambda run: {"score": run.get("train")["w"] * 2}).run,
                  needs=("data", "train")),
            Stage("card", stage("card", lambda run: {"card": f"score {run.get('evaluate')['score']}"}).run,
                  needs=("evaluate",)),
        ),
    )


def test_stages_run_in_the_recipe_order_and_see_earlier_results(tmp_path: Path) -> None:
    calls: list[str] = []
    run = run_recipe(RecipeRun(_toy(calls), tmp_path / "out", tmp_path / "work"))
    assert calls == ["data", "train", "evaluate", "card"] == run.ran
    assert run.results["card"] == {"card": "score 12"}
    assert {"data_seconds", "train_seconds", "evaluate_seconds", "card_seconds"} <= set(run.seconds)
    assert (tmp_path / "work" / STATE_FILE).exists()


def test_resume_skips_finished_stages_and_recomputes_unrecorded_ones(tmp_path: Path) -> None:
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="boom in evaluate"):
        run_recipe(RecipeRun(_toy(calls, fail_at="evaluate"), tmp_path / "out", tmp_path / "work"))
    assert calls == ["data", "train", "evaluate"]
    calls.clear()
    run = run_recipe(RecipeRun(_toy(calls), tmp_path / "out", tmp_path / "work"), resume=True)
    # train finished before the failure: not rerun, its recorded result used; data is not recorded
    # (persist=False) and evaluate needs it, so it is recomputed
    assert calls == ["data", "evaluate", "card"]
    assert run.results["card"] == {"card": "score 12"}
    calls.clear()
    run_recipe(RecipeRun(_toy(calls), tmp_path / "out", tmp_path / "work"), resume=True)
    assert calls == []  # everything recorded: nothing runs
    calls.clear()
    run_recipe(RecipeRun(_toy(calls), tmp_path / "out", tmp_path / "work"))  # no resume: from scratch
    assert calls == ["data", "train", "evaluate", "card"]


def test_resume_refuses_the_state_of_another_run(tmp_path: Path) -> None:
    run_recipe(RecipeRun(_toy([]), tmp_path / "out", tmp_path / "work"))
    with pytest.raises(RecipeError, match="same recipe, size and seed offset"):
        run_recipe(RecipeRun(_toy([]), tmp_path / "out", tmp_path / "work", size_name="tiny"), resume=True)


def test_only_and_skip(tmp_path: Path) -> None:
    calls: list[str] = []
    run_recipe(RecipeRun(_toy(calls), tmp_path / "o", tmp_path / "w"), skip=["card"])
    assert calls == ["data", "train", "evaluate"]
    calls.clear()
    run_recipe(RecipeRun(_toy(calls), tmp_path / "o", tmp_path / "w"), only=["card"], resume=True)
    assert calls == ["card"]
    calls.clear()
    with pytest.raises(RecipeError, match="needs the results of 'evaluate'"):
        run_recipe(RecipeRun(_toy(calls), tmp_path / "o", tmp_path / "w2"), only=["card"])
    with pytest.raises(RecipeError, match="no stage 'trian'; stages: data, train, evaluate, card"):
        run_recipe(RecipeRun(_toy(calls), tmp_path / "o", tmp_path / "w3"), skip=["trian"])


def test_a_recipe_config_cannot_need_a_later_stage() -> None:
    with pytest.raises(ValueError, match="needs \\['card'\\]"):
        RecipeConfig("bad", "1", "", {}, (Stage("a", lambda r: None, needs=("card",)), Stage("card", lambda r: None)))
    with pytest.raises(ValueError, match="unique"):
        RecipeConfig("bad", "1", "", {}, (Stage("a", lambda r: None), Stage("a", lambda r: None)))


def test_shipped_recipes_are_configurations_on_the_runner() -> None:
    from training.recipes.default_models import RECIPE, recipes

    assert recipes()["2.5d"] is RECIPE
    for recipe in recipes().values():
        assert recipe.stage_names == ("data", "train", "export", "evaluate", "parity", "latency", "card", "evidence")
        assert set(recipe.sizes) == {"full", "tiny"}
        assert not recipe.stage("data").persist  # rendered from seeds, recomputed on resume
        assert recipe.stage("evidence").needs == () and recipe.stage("card").needs == ()  # run alone on shipped models


def test_rerun_runs_a_recorded_stage_again_and_later_stages_see_it(tmp_path: Path) -> None:
    calls: list[str] = []
    run_recipe(RecipeRun(_toy(calls), tmp_path / "o", tmp_path / "w"))
    calls.clear()
    run = run_recipe(RecipeRun(_toy(calls), tmp_path / "o", tmp_path / "w"), resume=True, rerun=["evaluate", "card"])
    assert calls == ["data", "evaluate", "card"]  # train stays recorded; data recomputed for evaluate
    assert run.results["card"] == {"card": "score 12"}
