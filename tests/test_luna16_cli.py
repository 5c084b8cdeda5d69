"""A LUNA16 download (subsetN folders of mhd/raw + annotations.csv + candidates.csv) through the
documented command line: `convert --format luna16` then `split --by luna16-subset` (fold k = subset k)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from tiny_experiment import CONVERT, PREPROCESS_25D

from training.cli import main
from training.data.splits import Splits, SplitsError, luna16_subset_of, luna16_subset_splits

CONFIG = PREPROCESS_25D + CONVERT

SUBSETS = (0, 1, 2)
SCANS_PER_SUBSET = 2
ORIGIN = (-120.0, -120.0, -300.0)  # x, y, z mm (LPS)
SPACING = (3.0, 3.0, 4.0)  # x, y, z mm
SHAPE = (12, 40, 40)  # z, y, x


def write_luna16_tree(root: Path) -> dict[int, list[str]]:
    """subset0..2 with two scans each; the first scan of every subset has one annotated nodule."""
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(0)
    uids: dict[int, list[str]] = {}
    ann_rows, cand_rows = [], []
    for s in SUBSETS:
        (root / f"subset{s}").mkdir(parents=True)
        for i in range(SCANS_PER_SUBSET):
            uid = f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{s}{i}"
            hu = rng.normal(-800, 30, size=SHAPE).astype(np.int16)
            z, y, x = 6, 20, 20
            if i == 0:
                hu[z - 1 : z + 2, y - 3 : y + 3, x - 3 : x + 3] = 40  # a nodule
                ann_rows.append([uid, ORIGIN[0] + x * SPACING[0], ORIGIN[1] + y * SPACING[1],
                                 ORIGIN[2] + z * SPACING[2], 12.0])
            cand_rows.append([uid, ORIGIN[0], ORIGIN[1], ORIGIN[2], 0])
            img = sitk.GetImageFromArray(hu)
            img.SetSpacing(SPACING)
            img.SetOrigin(ORIGIN)
            sitk.WriteImage(img, str(root / f"subset{s}" / f"{uid}.mhd"))
            uids.setdefault(s, []).append(uid)
    for name, header, rows in (("annotations.csv", ["coordX", "coordY", "coordZ", "diameter_mm"], ann_rows),
                               ("candidates.csv", ["coordX", "coordY", "coordZ", "class"], cand_rows)):
        with open(root / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["seriesuid", *header])
            w.writerows(rows)
    return uids


def test_luna16_download_to_subset_folds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    luna = tmp_path / "LUNA16"
    uids = write_luna16_tree(luna)
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)
    tfr = tmp_path / "tfr"
    # the CSVs are found in the download's top folder; no --annotations/--candidates needed
    assert main(["convert", str(luna), str(tfr), "--format", "luna16", "--config", str(cfg), "--no-progress"]) == 0
    summary = json.loads((tfr / "dataset.json").read_text())
    assert summary["totals"]["patients"] == 6 and summary["totals"]["positive_patients"] == 3
    assert summary["totals"]["skipped_cases"] == 0

    assert main(["split", str(tfr), "--by", "luna16-subset"]) == 0
    splits = Splits.load(tfr / "splits.json")
    assert splits.method == "luna16-subset" and splits.test == ()
    assert [set(f) for f in splits.folds] == [set(uids[s]) for s in SUBSETS]  # fold k = subset k
    assert splits.fold_names == ("subset0", "subset1", "subset2")
    assert "fold 2: 2 patients (1 positive) [subset2]" in capsys.readouterr().out

    # a locked test split: the held-out subset, the others stay folds 0..k-1 in subset order
    assert main(["split", str(tfr), "--by", "luna16-subset", "--test-subsets", "2"]) == 0
    held = Splits.load(tfr / "splits.json")
    assert set(held.test) == set(uids[2]) and held.test_names == ("subset2",)
    assert [set(f) for f in held.folds] == [set(uids[0]), set(uids[1])]
    train, val = held.fold(1)
    assert set(val) == set(uids[1]) and set(train) == set(uids[0])

    assert main(["split", str(tfr), "--by", "luna16-subset", "--test-subsets", "7"]) == 2
    assert "test subset(s) [7] not found" in capsys.readouterr().err


def test_subset_split_refuses_scans_outside_subset_folders(tmp_path: Path) -> None:
    assert luna16_subset_of("/data/LUNA16/subset3/1.2.3.mhd") == 3
    assert luna16_subset_of("/data/subset3/extra/1.2.3.mhd") == 3
    assert luna16_subset_of("/data/LUNA16/1.2.3.mhd") is None
    summary = tmp_path / "dataset.json"
    patients = {"a": {"label": 0, "sources": ["/d/subset0/a.mhd"]}, "b": {"label": 1, "sources": ["/d/b.mhd"]},
                "c": {"label": 0, "sources": ["/d/subset1/c.mhd"]}}
    summary.write_text(json.dumps({"patients": patients}))
    with pytest.raises(SplitsError, match="not in exactly one subsetN folder"):
        luna16_subset_splits(summary)
    patients["b"]["sources"] = ["/d/subset0/b.mhd"]
    summary.write_text(json.dumps({"patients": patients}))
    s = luna16_subset_splits(summary)
    assert s.folds == (("a", "b"), ("c",))
    with pytest.raises(SplitsError, match="at least two"):
        luna16_subset_splits(summary, test_subsets=[1])


def test_pipeline_on_a_luna16_download_holds_out_the_last_subset(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from training import commands_model

    luna = tmp_path / "LUNA16"
    uids = write_luna16_tree(luna)
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG + f'[fit]\nprecision = "float32"\n[pipeline]\nsource = "luna16"\ninput_dir = "{luna}"\n'
                   'run_cv = false\n')

    class Stop(Exception):
        pass

    def train_fold(*args: object, **kwargs: object) -> None:
        raise Stop  # the data steps are what this test is about

    monkeypatch.setattr(commands_model, "train_fold", train_fold)
    with pytest.raises(Stop):
        main(["pipeline", "--config", str(cfg)])
    splits = Splits.load(tmp_path / "work" / "tfr" / "splits.json")
    assert splits.method == "luna16-subset" and splits.test_names == ("subset2",)
    assert set(splits.test) == set(uids[2]) and [set(f) for f in splits.folds] == [set(uids[0]), set(uids[1])]
