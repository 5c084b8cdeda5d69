# ruff: noqa: E501  (the card is a Markdown template: its table rows are long lines by nature)
"""MODEL_CARD.md of the fundus recipes, rendered from evaluation.json: no figure is typed by hand."""

from __future__ import annotations

import logging
from typing import Any

from medclf_node.inference.manifest import Manifest
from medclf_node.synthetic.fundus import GRADE_NAMES

log = logging.getLogger(__name__)


def _f(x: float, nd: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{nd}f}"


def _ci(v: float, ci: list[float]) -> str:
    return f"{_f(v)} (95% CI {_f(ci[0])} to {_f(ci[1])})"


def _graded(report: dict[str, Any]) -> str:
    ev = report["evaluation"]
    i8, f32 = ev["model_int8.tflite"], ev["model_fp32.tflite"]
    t8, t32 = i8["test"], f32["test"]
    rows = "\n".join(
        f"| {k} {GRADE_NAMES[k]} | {a['support']} | {_f(a['sensitivity'])} | {_f(a['specificity'])} | {_f(b['sensitivity'])} | {_f(b['specificity'])} |"
        for k, (a, b) in enumerate(zip(t8["per_class"], t32["per_class"], strict=True)))
    conf = "\n".join(f"| **{k}** | " + " | ".join(str(v) for v in row) + " |" for k, row in enumerate(t8["confusion"]))
    par = ev["parity_int8_vs_fp32"]["test"]
    par_rows = "\n".join(f"| {k} {GRADE_NAMES[k]} | {_f(p['max'], 4)} | {_f(p['p99'], 4)} | {_f(p['mean'], 4)} |"
                         for k, p in enumerate(par["per_output"]))
    plots = ", ".join(f"`{p}`" for p in ev["plots"])
    return f"""## Evaluation (synthetic test split, n = {t8['n']}; never used for any choice)

| | int8 (served) | fp32 |
|---|---|---|
| **quadratic weighted kappa** ({t8['decoding']} decoding, as served) | **{_ci(t8['qwk'], t8['qwk_ci95'])}** | {_ci(t32['qwk'], t32['qwk_ci95'])} |
| kappa, argmax decoding | {_f(t8['qwk_argmax_decoding'])} | {_f(t32['qwk_argmax_decoding'])} |
| kappa, rounded expected-grade decoding | {_f(t8['qwk_expected_decoding'])} | {_f(t32['qwk_expected_decoding'])} |
| accuracy (exact grade) | {_f(t8['accuracy'])} | {_f(t32['accuracy'])} |
| referable DR (grade >= 2) AUC of P(grade >= 2) | {_ci(t8['referable_auc'], t8['referable_auc_ci95'])} | {_ci(t32['referable_auc'], t32['referable_auc_ci95'])} |
| validation kappa | {_f(i8['val']['qwk'])} | {_f(f32['val']['qwk'])} |

CIs: percentile bootstrap over images ({t8['bootstrap']} resamples). Decoding (`decoding` in the manifest) chosen on the
validation split: {ev['decoding']['rule']}, validation kappa {', '.join(f"{k} {_f(v)}" for k, v in ev['decoding']['validation_qwk'].items())}.

### Per grade (one-vs-rest, test split)

| grade | n | int8 sensitivity | int8 specificity | fp32 sensitivity | fp32 specificity |
|---|---|---|---|---|---|
{rows}

### Confusion matrix, int8 (rows truth, columns predicted grade)

| truth \\ predicted | 0 | 1 | 2 | 3 | 4 |
|---|---|---|---|---|---|
{conf}

Plots: {plots}.

### int8 vs fp32 parity per class (test images, |P_int8 - P_fp32|)

| class | max | 99th percentile | mean |
|---|---|---|---|
{par_rows}

Same decoded grade on {100 * par['grade_agreement']:.1f}% of test images; int8 - fp32 kappa {t8['qwk'] - t32['qwk']:+.4f}.
"""


def _multilabel(report: dict[str, Any]) -> str:
    ev = report["evaluation"]
    t8, t32 = ev["model_int8.tflite"]["test"], ev["model_fp32.tflite"]["test"]
    rows = "\n".join(
        f"| {n} | {r['positive']}/{r['n']} | {_ci(r['auc'], r['auc_ci95'])} | {_f(r['threshold'], 4)} | {_f(r['sensitivity'])} | {_f(r['specificity'])} | {_ci(t32[n]['auc'], t32[n]['auc_ci95'])} |"
        for n, r in t8.items())
    par = ev["parity_int8_vs_fp32"]["test"]
    return f"""## Evaluation (synthetic test split; thresholds chosen per finding on validation, max Youden J)

| finding | positive | int8 AUC | threshold | sensitivity | specificity | fp32 AUC |
|---|---|---|---|---|---|---|
{rows}

int8 vs fp32 per finding, max |difference|: {', '.join(_f(p['max'], 4) for p in par['per_output'])}; mean {_f(par['mean'], 4)}.
"""


def render_fundus_card(report: dict[str, Any], manifest: Manifest) -> str:
    """The model card of a fundus recipe run."""
    size = report["size"]
    tr = report["training"]
    mc = tr["model_config"]
    data = tr["data"]
    par = report["node_parity"]
    lat = report["latency"]
    graded = report["task"] == "multiclass"
    arts = "\n".join(f"| `{a.path}`{' (default)' if a.path == manifest.default_artifact else ''} | {a.precision} | "
                     f"{report['artifact_bytes'][a.path] / 1024:.0f} kB | `{a.sha256[:16]}...` |" for a in manifest.artifacts)
    split_rows = "\n".join(f"| {k} | {v['images']} | {v['first_seed']}.. | {v['grades']} |" for k, v in data.items())
    head = ("ordinal cumulative-link head (one score, four ordered learned cut-points, five class probabilities; "
            "trained by the grade's negative log-likelihood; `training.modeling.ordinal`); the node decodes it as the manifest's `decoding` says"
            if graded else "two independent sigmoid units (multilabel), one threshold each")
    family = ("multi-scale 2D CNN (`multiscale2d`: a full-resolution path and a 2x-downsampled path, fused)"
              if mc["family"] == "multiscale2d" else f"`{mc['family']}`")
    res = size["image"]
    dicom = (f"; {par['dicom_same_grade']}/{par['dicom_images']} gave the same grade" if graded else "")
    body = _graded(report) if graded else _multilabel(report)
    return f"""# Model card: {manifest.name} {manifest.version}

> **Demonstration model, NOT for clinical use.** Trained and tested **only on synthetic fundus photographs**
> generated in code; the evidence below is synthetic-only and makes no claim about real retinal images.
> Its outputs carry "AI result - not for primary diagnosis".

Generated by `training/recipes/fundus_recipes.py` from `evaluation.json` of the same run (recipe size {report['recipe_size']}).

## Task and model

- Task: {'DR severity grade 0-4 (International Clinical DR scale): ' + ', '.join(f'{k} {n}' for k, n in enumerate(GRADE_NAMES)) if graded else 'findings ' + ', '.join(f.code.meaning for f in manifest.findings)}
  per image (manifest schema 2, task `{manifest.task}`{', ordinal' if graded else ''}, input kind `image`){'; referable DR = grade >= 2 (`positive_classes` 2-4); a study is summarised by the worst grade' if graded else ''}.
- Architecture: {family}{f", base filters {mc.get('base_filters')}" if mc['family'] == 'multiscale2d' else ''}, {head}.
- **Resolution: {res} x {res}** model input (the full-resolution path at {res}, the downsampled path at {res // 2});
  a small-resolution variant of the 512/256 design so that it trains on 2 CPU cores. Larger photographs are
  box-averaged down by the node (`preprocess.image_input`, RGB display values in [0, 1]).
- Trained: AdamW, warmup + cosine, batch {size['batch_size']}, {tr['epochs_run']} epochs (best validation loss at
  epoch {tr['best_epoch']}), flips and brightness jitter; BatchNorm statistics recomputed on training images.

| artifact | precision | size | sha256 |
|---|---|---|---|
{arts}

## Data (synthetic only)

`medclf_node.synthetic.fundus.make_fundus`: circular field with vignetting, optic disc, branching vessels,
and microaneurysms, dot/blot haemorrhages, hard exudates, cotton-wool spots, venous beading, IRMA,
neovascularisation and preretinal haemorrhage; the grade is computed from the drawn lesions (4-2-1 rule for
severe NPDR on the synthetic quadrants), never assigned. Grades are balanced (seed mod 5); the seed is the
patient and splits use disjoint seed ranges.

| split | images | seeds | images per grade 0-4 |
|---|---|---|---|
{split_rows}

{body}
## Through the node

- The node's `predict_images` (registry, `image_input`, LiteRT) reproduces the recipe's probabilities on all
  {par['test_images']} test images (max |difference| {par['max_abs_diff']:.1e}).
- {par['dicom_images']} photographs rendered at {par['dicom_image_size']} x {par['dicom_image_size']}, written as Ophthalmic Photography 8 Bit
  JPEG baseline (YBR_FULL_422) DICOM and read back by the node's image reader: max |P(DICOM) - P(pixels)|
  {par['dicom_vs_pixels_max_abs_diff']:.4f}, mean {par['dicom_vs_pixels_mean_abs_diff']:.4f} (JPEG loss){dicom}.
- Latency per {lat['image']} x {lat['image']} image through `predict_images` (no heat map), 2 threads, median of
  {lat['repeats']}: int8 {lat['model_int8.tflite']['image_seconds_median'] * 1000:.1f} ms, fp32 {lat['model_fp32.tflite']['image_seconds_median'] * 1000:.1f} ms
  ({lat['int8_speedup_per_image']:.2f}x; the resize of the photograph dominates); the model alone on a batch of 16
  preprocessed inputs: int8 {lat['model_int8.tflite']['model_only_seconds_per_image'] * 1000:.2f} ms, fp32 {lat['model_fp32.tflite']['model_only_seconds_per_image'] * 1000:.2f} ms per image
  ({lat['int8_model_only_speedup']:.2f}x). On the shared machine that ran the recipe (timings round-robin over the
  artifacts); `benchmarks/dr_images.py` measures both again in one run.

## Limitations

- Synthetic photographs only: real fundus images differ in texture, colour, artefacts, field, lesion
  appearance and grading ambiguity; performance on them is unknown. Do not use clinically.
- Lesions are drawn larger than true scale so that the {res}-pixel input shows them{'; microaneurysms (grade 1) are the hardest grade here and in practice' if graded else ''}.
{'- Macular oedema is not modelled; the grade is the DR severity level only.' + chr(10) if graded else ''}{''.join(f"- {n}" + chr(10) for n in report.get('notes', []))}
## Reproduce

```
{report['command']}
```
"""


__all__ = ["render_fundus_card"]
