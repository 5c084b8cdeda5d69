# ruff: noqa: E501  (the card is a Markdown template: its table rows are long lines by nature)
"""MODEL_CARD.md rendered from the recipe's evaluation record: no figure in a card is typed by hand."""

from __future__ import annotations

import logging
from typing import Any

from medclf_node.inference.manifest import Manifest

log = logging.getLogger(__name__)


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def _conf(c: dict[str, Any]) -> str:
    return f"TP {c['tp']}, FP {c['fp']}, TN {c['tn']}, FN {c['fn']}"


#: How the earlier test split (seeds 300000..) was used while each shipped model was developed.
SELECTION_2P5D = (
    "The earlier test split (seeds 300000..) was seen during development: this model was trained once and scored "
    "on it once, but the same split was then used for model selection across the three retrainings of "
    "`nodule-3d-cbam` and its figures were read while the recipes were chosen, so it is not an independent test."
)
SELECTION_3D = (
    "The earlier test split (seeds 300000..) was used for model selection across three retrainings of this model "
    "(test AUC 0.894 -> 0.937 -> 0.962: 140 phantoms, then 280, then 360 with in-plane rotation; the last was kept "
    "because it reached the 0.95 target on that split), so its 0.962 is optimistic and not an independent test."
)


def _evidence_command(report: dict[str, Any]) -> str:
    ev = report.get("evidence")
    return f"\n{ev['command']}" if ev and ev.get("command") else ""


def _ci(r: dict[str, Any]) -> str:
    lo, hi = r["auc_ci95"]
    return f"{r['auc']:.4f} ({lo:.4f}-{hi:.4f})"


def _rate(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


def shift_limitations(report: dict[str, Any]) -> str:
    """Limitations bullets generated from the evidence: every set where the served artifact falls short."""
    ev = report.get("evidence")
    if not ev:
        return ""
    served = ev["served_artifact"]
    lines = ["- Quote the locked-range figures (Evidence), not the earlier test split's: that split was seen "
             "during development."]
    for name, r in ev["sets"].items():
        if name in ("validation", "earlier_test"):
            continue
        a = r["artifacts"][served]
        sens = a["confusion"]["sensitivity"]
        if a["auc"] < 0.9 or sens < 0.8:
            what = ("expect these to be missed" if a["auc"] < 0.8 else
                    "the shipped threshold misses more of these than in distribution")
            lines.append(f"- **{r['title']}:** AUC {_ci(a)}, sensitivity {_rate(sens)} at the shipped threshold "
                         f"(n = {r['n']}): {what}.")
    return "\n".join(lines) + "\n"


def render_evidence(report: dict[str, Any], manifest: Manifest, selection: str) -> str:
    """The Evidence section: locked range, shift sets, baselines, per-artifact thresholds, artifact shift."""
    ev = report.get("evidence")
    if not ev:
        return ("## Evidence\n\nNo evidence stage recorded yet: run `python -m training.recipes.default_models "
                "--evidence-only` (locked test range, shift sets, baselines).\n")
    served, ref = ev["served_artifact"], ev["reference_artifact"]
    sets = ev["sets"]
    thr = ev["thresholds"]
    rows = []
    for name, r in sets.items():
        a, b = r["artifacts"][served], r["artifacts"][ref]
        ca, cb = a["confusion"], b["confusion"]
        label = r["title"] if name != "locked" else f"**{r['title']}**"
        rows.append(f"| {label} | {r['n']} ({r['n_positive']}) | {_ci(a)} | {_rate(ca['sensitivity'])} | "
                    f"{_rate(ca['specificity'])} | {_ci(b)} | {_rate(cb['sensitivity'])} | {_rate(cb['specificity'])} |")
    base_names = list(ev["baseline_definitions"])
    base_rows = []
    for r in sets.values():
        if not r["baselines"]:
            continue
        cells = " | ".join(_ci(r["baselines"][k]) for k in base_names)
        base_rows.append(f"| {r['title']} | {r['n']} | {_ci(r['artifacts'][served])} | {cells} |")
    shift_rows = "\n".join(
        f"| {r['title']} | {r['n']} | {r['series_probability_shift']['max']:.4f} | "
        f"{r['series_probability_shift']['mean']:.4f} |" for r in sets.values())
    sh, inp = ev["artifact_shift"]["series"], ev["artifact_shift"]["validation_inputs"]
    orient = []
    for r in sets.values():
        o = r.get("node_canonical_orientation")
        if o:
            orient.append(f"{r['definition']['position']}: {o['canonical']}/{o['series']}")
    warns = sorted({w.split(" (")[0] for r in sets.values() for w in r["warnings"]})
    locked = sets["locked"]
    la = locked["artifacts"][served]
    seed_lo = min(r["definition"]["first_seed"] for r in sets.values() if "definition" in r)
    thr_rows = "\n".join(
        f"| `{a}`{' (served, = manifest threshold)' if a == served else ''} | {t:.4f} | "
        f"{sets['validation']['artifacts'][a]['auc']:.4f} |" for a, t in thr.items())
    base_txt = "; ".join(f"`{k}`: {v}" for k, v in ev["baseline_definitions"].items())
    plots = ", ".join(f"`{p}`" for p in ev.get("plots", []))
    return f"""## Evidence: locked test range, distribution shift, baselines

- **Model selection:** {selection}
- **Locked test range:** phantom seeds from {seed_lo} on, disjoint from every range used before
  ({', '.join(f'{k} {a}..{b}' for k, (a, b) in ev['used_seed_ranges'].items())}); no threshold, aggregation, recipe
  or model was chosen on them. On the locked in-distribution set the served `{served}` scores
  **AUC {_ci(la)}** (n = {locked['n']}, {locked['n_positive']} positive), sensitivity {_rate(la['confusion']['sensitivity'])},
  specificity {_rate(la['confusion']['specificity'])} at its validation threshold.
- Every series below is scored by the node's own registry and predictor (`load_model(artifact=...)` +
  `predict_series`: the node's preprocessing, {'sliding window' if manifest.preprocessing.mode == '3d' else 'slice aggregation'} and runtimes).
  Prone (HFP) and feet-first (FFS) series are written as DICOM and read back through the node's `assemble_volume`;
  the node returned the canonical array for {', '.join(orient) or 'n/a'} series.
- Sets are small (n per row); the 95% CIs are percentile bootstrap ({ev['bootstrap']} resamples) and wide.
{('- **Fewer than 30 cases:** ' + ', '.join(warns) + ' (indicative only).' + chr(10)) if warns else ''}
### Shift report (series level; sensitivity / specificity at each artifact's own validation threshold)

| set | n (positive) | `{served}` AUC (95% CI) | sens | spec | `{ref}` AUC (95% CI) | sens | spec |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

### Trivial baselines on the same series (no model; AUC, 95% CI)

{base_txt}.

| set | n | `{served}` | {' | '.join(f'`{k}`' for k in base_names)} |
|---|---|---|{'---|' * len(base_names)}
{chr(10).join(base_rows)}

### Threshold of each artifact (chosen on that artifact's validation scores)

| artifact | threshold | validation AUC |
|---|---|---|
{thr_rows}

The manifest schema (`medclf_node.inference.manifest`) has one `threshold`, not one per artifact: it holds the
served artifact's threshold. A node configured to serve `{ref}` instead applies that same threshold; use
{thr[ref]:.4f} for `{ref}` (recorded in `evaluation.json`, `evidence.thresholds`).

### `{served}` vs `{ref}`: series-probability shift

Over all {sh['n']} series scored above: max |p({served}) - p({ref})| **{sh['max']:.4f}**, mean **{sh['mean']:.4f}**
(99th percentile {sh['p99']:.4f}). Per model input ({'slice' if manifest.preprocessing.mode != '3d' else 'window'}) on the validation series
(n = {inp['n']}): max {inp['max']:.4f}, mean {inp['mean']:.4f}, 99th percentile {inp['p99']:.4f}.

| set | n | max shift | mean shift |
|---|---|---|---|
{shift_rows}

Plots (served artifact, validation and locked test, operating point marked): {plots or 'none'}.
"""


def render_card(report: dict[str, Any], manifest: Manifest) -> str:
    """The model card of a recipe run (``report`` is what the recipe writes to evaluation.json)."""
    spec = manifest.preprocessing
    agg = manifest.aggregation
    agg_txt = "max" if agg is None or agg.method == "max" else f"mean of the top {agg.k} slice scores"
    i8, f32 = report["int8"], report["fp32"]
    t8, tf = i8["test_series"], f32["test_series"]
    lat = report["latency"]
    splits = report["splits"]
    data = report["data"]
    tr = report["data"]["train_slice_samples"]
    fit = report["fit"]
    arts = "\n".join(
        f"| `{a.path}`{' (default)' if a.path == manifest.default_artifact else ''} | {a.format} | {a.precision} | "
        f"{report['artifact_bytes'][a.path] / 1024:.0f} kB | `{a.sha256[:16]}...` |"
        for a in manifest.artifacts
    )
    win = ", ".join(f"center {w.center:g} HU / width {w.width:g} HU" for w in spec.windows)
    split_rows = "\n".join(
        f"| {name} | {p['count']} | {p['first_seed']} .. {p['first_seed'] + p['count'] - 1} | "
        f"{', '.join('x'.join(map(str, s)) for s in p['shapes'])} |"
        for name, p in splits.items()
    )
    lat_rows = "\n".join(
        f"| `{art}` | {lat[art]['series_seconds_median']:.3f} s | {lat[art]['series_seconds_with_heatmap_median']:.3f} s "
        f"| {lat[art]['model_only_seconds']:.3f} s ({lat[art]['model_inputs']} inputs) |"
        for art in (a.path for a in manifest.artifacts)
    )
    shape = "x".join(map(str, lat["series_shape"]))
    spacing = " x ".join(f"{s:g}" for s in lat["series_spacing_mm"])
    r_lo, r_hi = splits["train"]["radius_range_mm"]
    a = report["augment"]
    aug_txt = (f"left-right flip p={a['flip_prob']:g}, rotation +-{a['rotate_deg']:g} deg, contrast +-{a['contrast']:g}, "
               f"brightness +-{a['brightness']:g}, translation +-{a['shift_px']} px")
    agg_aucs = ", ".join(f"{k} {v:.4f}" for k, v in report["validation_aggregation_aucs"].items())
    return f"""# Model card: {manifest.name} {manifest.version}

> **Demonstration model, NOT for clinical use.** Trained and tested only on synthetic CT phantoms.
> It makes no claim of clinical validity; its outputs carry "AI result - not for primary diagnosis".

This card is generated by `training/recipes/default_models.py`; every figure below comes from
`{'evaluation.json'}` written by the same run (recipe size: {report['recipe_size']}).

## Intended use

- Show the medclf-node loop end to end (DICOM in, TID 1500 SR + Secondary Capture out) with a real,
  quantised model, on synthetic studies such as those of `medclf-node demo`.
- A template for training your own model with the `training` package.
- **Out of scope:** any clinical, diagnostic or screening use; real patient CT. Real CT differs from
  these phantoms in anatomy, noise, reconstruction kernels and pathology; performance on it is unknown.

## Model

- Task: series-level classification, finding SCT {manifest.labels.finding.value} "{manifest.labels.finding.meaning}"
  (Present / Absent).
- Architecture: small 2D CNN (`cnn2d`, base filters {report['model_config']['base_filters']},
  {report['model_config']['max_stages']} stride-2 stages, global average pooling, sigmoid), tf-keras, exported to LiteRT.
- Input: {spec.mode} - each slice with {spec.context_slices} neighbour(s) above and below as channels,
  shape {list(manifest.input.shape)} (NHWC); volume resampled to {" x ".join(f"{s:g}" for s in spec.target_spacing or ())} mm
  (slice, row, column; z resampled: {spec.resample_z}), centre-cropped/padded in-plane; lung window ({win}) scaled to [0, 1].
- Series score: {agg_txt} over the model slices (chosen on validation: {agg_aucs}).
- Threshold: {manifest.threshold:.4f} on P(nodule), chosen on the **validation** split (max Youden J, in the middle of the
  validation score gap that reaches it), never on test.

| artifact | format | precision | size | sha256 |
|---|---|---|---|---|
{arts}

The node serves the int8 artifact (`default_artifact`) with LiteRT only: TensorFlow is not needed to run it.

## Data

Synthetic chest CT phantoms from `medclf_node.synthetic.phantoms.make_phantom`: body outline, textured lungs
denser posteriorly, branching vessels (round in cross-section, so a nodule is not "any bright blob"),
ribs, spine, sternum, heart, scanner blur and noise; solid and ground-glass nodules of radius
{r_lo:g}-{r_hi:g} mm (log-uniform; the demo model is scoped to nodules of at least {2 * r_lo:g} mm diameter). Pixel spacing and slice thickness vary per phantom by +-{100 * splits['train']['spacing_jitter']:.0f}%
(`training.data.synth.case_spacing`). Odd seeds carry 1-3 nodules, even seeds none (series label balanced).
The phantom seed is the patient: the splits use disjoint seed ranges, so no patient is in two splits
(checked with `training.data.splits.assert_no_leakage`).

| split | series | seeds | volume shapes (slices x rows x cols) |
|---|---|---|---|
{split_rows}

- Training samples (2.5D slices): {tr['samples']} ({tr['positive_samples']} with a nodule, incl. left-right mirrored
  copies of the positives) from {tr['series']} series; per series every slice cutting a nodule
  (cross-section >= half its radius), as many "matched" clear slices a few slices away from a nodule (same
  anatomy, no nodule), and {report['size']['negatives_per_series']} random clear slices (three quarters through the lungs).
- Augmentation on every pass (`training.data.augment`): {aug_txt}.
- Validation: {data['val_series']} series ({data['val_positive']} positive); test: {data['test_series']} series
  ({data['test_positive']} positive), evaluated on every slice of every series.
- Training: AdamW, peak LR {fit['learning_rate']:g} with warmup + cosine decay, batch {fit['batch_size']},
  class weights, float32, {report['training']['epochs_run']} epoch(s) (best slice-level validation AUC during
  training {report['training']['best_val_slice_auc']:.4f}), seed {fit['seed']}; then the BatchNorm statistics were
  recomputed on training samples (Keras' moving averages lag the weights on so short a CPU schedule).

## Earlier test split (series level, as the node aggregates; seen during development, see Evidence)

| | int8 (served) | fp32 |
|---|---|---|
| test AUC (95% bootstrap CI, {report['size']['bootstrap']} resamples) | {t8['auc']:.4f} ({t8['auc_ci95'][0]:.4f}-{t8['auc_ci95'][1]:.4f}) | {tf['auc']:.4f} ({tf['auc_ci95'][0]:.4f}-{tf['auc_ci95'][1]:.4f}) |
| sensitivity at its validation threshold | {_pct(t8['confusion']['sensitivity'])} | {_pct(tf['confusion']['sensitivity'])} |
| specificity at its validation threshold | {_pct(t8['confusion']['specificity'])} | {_pct(tf['confusion']['specificity'])} |
| threshold (from validation) | {i8['threshold']:.4f} | {f32['threshold']:.4f} |
| confusion | {_conf(t8['confusion'])} | {_conf(tf['confusion'])} |
| validation AUC | {i8['validation_series']['auc']:.4f} | {f32['validation_series']['auc']:.4f} |
| slice-level test AUC | {i8['test_slices']['auc']:.4f} | {f32['test_slices']['auc']:.4f} |
| Brier score (test series) | {t8['calibration']['brier']:.4f} | {tf['calibration']['brier']:.4f} |

- int8 vs fp32 test AUC delta: {report['int8_minus_fp32_test_auc']:+.4f} (an AUC delta hides how far the probabilities move: see the series-probability shift under Evidence).
- Keras vs fp32 .tflite, max |difference| in probability on validation slices: {report['keras_vs_tflite_fp32_max_abs_diff']:.2e}.
- The node's own loader and predictor (`medclf_node.inference.registry` + `predict`) reproduce the recipe's
  series probabilities on all {report['node_parity']['series']} test series (max |difference| {report['node_parity']['max_abs_diff']:.1e}).

{render_evidence(report, manifest, SELECTION_2P5D)}
## CPU latency per series

The node's predictor (`predict_series`, preprocessing included) on one {shape} phantom series
({spacing} mm), 2 threads, median of {lat['repeats']} run(s) on the machine that ran the recipe
(2 cores, shared with other work while it ran):

| artifact | per series | with occlusion heat map | model only |
|---|---|---|---|
{lat_rows}

## Limitations

- Synthetic data only; nodules are spheres with lobulated edges; no calcifications, masses, effusions,
  motion or metal artefacts. Expect failure on real CT until retrained on real, labelled data.
{shift_limitations(report)}{_target_line(t8['auc'], report=report) if report.get('evidence') else ''}- The {(spec.target_spacing or (0.0, 0.0, 0.0))[1]:g} mm model grid blurs nodules under ~{2 * (spec.target_spacing or (0.0, 0.0, 0.0))[1]:g} mm in diameter; expect them to be missed.
- The operating point was chosen on a small synthetic validation split; the CI above shows how little
  a small test split pins the AUC down.

## Reproduce

```
{report['command']}{_evidence_command(report)}
```

Deterministic seeds (phantoms, splits, training seed {fit['seed']}); TensorFlow on CPU may still vary in the last digits.
"""


def _last(history: dict[str, list[float]], key: str) -> str:
    """Last value of a Keras history series, or 'n/a'."""
    values = history.get(key) or []
    return f"{values[-1]:.4f}" if values else "n/a"


def _target_line(test_auc: float, target: float = 0.95, report: dict[str, Any] | None = None) -> str:
    """States plainly whether the shipped model reaches the project's target AUC: on the locked test range
    when the evidence stage ran (the earlier test split was seen during development), else on the test split."""
    ev = (report or {}).get("evidence")
    if ev:
        la = ev["sets"]["locked"]["artifacts"][ev["served_artifact"]]
        where = f"locked test AUC {_ci(la)}"
        if la["auc"] >= target:
            return f"- {where[0].upper() + where[1:]} meets the project's target for shipped models (>= {target:g}).\n"
        return (f"- **Below target:** {where} is under the project's target for shipped models (>= {target:g}); "
                f"the earlier test split's {test_auc:.4f} is not independent evidence (see Evidence).\n")
    if test_auc >= target:
        return f"- Held-out test AUC {test_auc:.4f} meets the project's target for shipped models (>= {target:g}).\n"
    return (f"- **Below target:** held-out test AUC {test_auc:.4f} is under the project's target for shipped models "
            f"(>= {target:g}); the 2.5D model `nodule-2p5d-int8` is the default for that reason.\n")


def render_card_3d(report: dict[str, Any], manifest: Manifest) -> str:
    """The model card of a 3D recipe run (``training.recipes.model_3d``; ``report`` = its evaluation.json)."""
    spec = manifest.preprocessing
    served, full = report["fp16"], report["saved_model"]
    rot_txt = f" in-plane rotation +-{report['augment']['rotate_deg']:g} deg," if report["augment"]["rotate_deg"] else ""
    train_auc = (report["training"]["history"].get("auc") or [0.0])[-1]
    fit_txt = ": it overfits" if train_auc > report["training"]["best_val_window_auc"] + 0.01 else ""
    ts, tf = served["test_series"], full["test_series"]
    lat = report["latency"]
    splits = report["splits"]
    data = report["data"]
    tr = data["train_windows"]
    fit = report["fit"]
    mc = report["model_config"]
    win = report["window"]
    sizes = report["artifact_bytes"]
    arts = "\n".join(
        f"| `{a.path}`{' (default)' if a.path == manifest.default_artifact else ''} | {a.format} | {a.precision} | "
        f"{sizes[a.path] / 1024:.0f} kB | `{a.sha256[:16]}...` |"
        for a in manifest.artifacts
    )
    wtxt = ", ".join(f"center {w.center:g} HU / width {w.width:g} HU" for w in spec.windows)
    split_rows = "\n".join(
        f"| {name} | {p['count']} | {p['first_seed']} .. {p['first_seed'] + p['count'] - 1} | "
        f"{', '.join('x'.join(map(str, s)) for s in p['shapes'])} |"
        for name, p in splits.items()
    )
    lat_rows = "\n".join(
        f"| `{art}` | {lat[art]['series_seconds_median']:.3f} s | {lat[art]['series_seconds_with_heatmap_median']:.3f} s "
        f"| {lat[art]['model_only_seconds']:.3f} s ({lat[art]['model_inputs']} windows) | {lat[art]['load_seconds']:.2f} s |"
        for art in (a.path for a in manifest.artifacts)
    )
    shape = "x".join(map(str, lat["series_shape"]))
    spacing = " x ".join(f"{s:g}" for s in lat["series_spacing_mm"])
    r_lo, r_hi = splits["train"]["radius_range_mm"]
    grid = " x ".join(f"{s:g}" for s in spec.target_spacing or ())
    depth_mm = win["depth"] * (spec.target_spacing or (0.0,))[0]
    a = report["augment"]
    return f"""# Model card: {manifest.name} {manifest.version}

> **Demonstration model, NOT for clinical use.** Trained and tested only on synthetic CT phantoms.
> It makes no claim of clinical validity; its outputs carry "AI result - not for primary diagnosis".

This card is generated by `training/recipes/model_3d.py` (via `training/recipes/default_models.py --model 3d`);
every figure below comes from `evaluation.json` written by the same run (recipe size: {report['recipe_size']}).

## Intended use

- Show the medclf-node loop end to end with a 3D volume classifier (DICOM in, TID 1500 SR + Secondary
  Capture out), served by LiteRT (fp16, no TensorFlow needed) or by TensorFlow (SavedModel).
- A template for training your own 3D model with the `training` package.
- **Out of scope:** any clinical, diagnostic or screening use; real patient CT. Real CT differs from
  these phantoms in anatomy, noise, reconstruction kernels and pathology; performance on it is unknown.

## Model

- Task: series-level classification, finding SCT {manifest.labels.finding.value} "{manifest.labels.finding.meaning}"
  (Present / Absent).
- Architecture: 3D CNN with CBAM attention (`cnn3d_cbam`, base filters {mc['base_filters']}, up to {mc['max_stages']}
  stride-2 Conv3D stages each followed by channel + spatial attention, the first {mc.get('inplane_stages', 0)} of them
  in-plane only (1x3x3 kernels and strides, the slices being thicker than the pixels), global
  {'max' if mc.get('head_pooling') == 'max' else 'average'} pooling, sigmoid), tf-keras.
  No 3D pooling layers (TFLite has none) and no int8 (TFLite has no int8 Conv3D): exported as fp16 .tflite and SavedModel.
- Input: 3D windows of shape {list(manifest.input.shape)} (NDHWC: {win['depth']} slices = {depth_mm:g} mm deep); volume
  resampled to {grid} mm (slice, row, column), centre-cropped/padded in-plane; lung window ({wtxt}) scaled to [0, 1].
- Series score: the node slides the window along z with stride {win['stride']} (manifest `sliding_window`) and takes
  the **max** over the windows.
- Threshold: {manifest.threshold:.4f} on P(nodule), chosen on the **validation** split (max Youden J, in the middle of the
  validation score gap that reaches it), never on test.

| artifact | format | precision | size | sha256 |
|---|---|---|---|---|
{arts}

The node serves the fp16 artifact (`default_artifact`) with LiteRT only: TensorFlow is not needed to run it.

## Data

Synthetic chest CT phantoms from `medclf_node.synthetic.phantoms.make_phantom` (the same generator and seed
ranges as `nodule-2p5d-int8`): body outline, textured lungs, branching vessels, ribs, spine, sternum, heart,
scanner blur and noise; solid and ground-glass nodules of radius {r_lo:g}-{r_hi:g} mm. Pixel spacing and slice
thickness vary per phantom by +-{100 * splits['train']['spacing_jitter']:.0f}% (`training.data.synth.case_spacing`).
Odd seeds carry 1-3 nodules, even seeds none (series label balanced). The phantom seed is the patient: the splits
use disjoint seed ranges, so no patient is in two splits (checked with `training.data.splits.assert_no_leakage`).

| split | series | seeds | volume shapes (slices x rows x cols) |
|---|---|---|---|
{split_rows}

- Training windows: {tr['windows']} ({tr['positive_windows']} with a nodule) from {tr['series']} series. A window is
  positive when a nodule centre lies inside it, at least {win['edge_slices']} slice(s) from its ends; windows that a
  nodule only reaches into are left out; negatives are {report['size']['negatives_per_series']} + half as many as
  the positives per series, drawn from the clear windows.
- Augmentation on every pass (`training.data.augment`): left-right flip p={a['flip_prob']:g},{rot_txt} contrast
  +-{a['contrast']:g}, brightness +-{a['brightness']:g}.
- Validation: {data['val_series']} series ({data['val_positive']} positive); test: {data['test_series']} series
  ({data['test_positive']} positive), each scored over all its windows exactly as the node does.
- Training: AdamW, peak LR {fit['learning_rate']:g} with warmup + cosine decay, batch {fit['batch_size']},
  class weights, float32, {report['training']['epochs_run']} epoch(s) (best window-level validation AUC during
  training {report['training']['best_val_window_auc']:.4f}), seed {fit['seed']}, TensorFlow on {report['threads']}
  thread(s); then the BatchNorm statistics were recomputed on training windows.

## Earlier test split (series level, as the node aggregates; seen during development, see Evidence)

| | fp16 .tflite (served) | SavedModel (fp32) |
|---|---|---|
| test AUC (95% bootstrap CI, {report['size']['bootstrap']} resamples) | {ts['auc']:.4f} ({ts['auc_ci95'][0]:.4f}-{ts['auc_ci95'][1]:.4f}) | {tf['auc']:.4f} ({tf['auc_ci95'][0]:.4f}-{tf['auc_ci95'][1]:.4f}) |
| sensitivity at its validation threshold | {_pct(ts['confusion']['sensitivity'])} | {_pct(tf['confusion']['sensitivity'])} |
| specificity at its validation threshold | {_pct(ts['confusion']['specificity'])} | {_pct(tf['confusion']['specificity'])} |
| threshold (from validation) | {served['threshold']:.4f} | {full['threshold']:.4f} |
| confusion | {_conf(ts['confusion'])} | {_conf(tf['confusion'])} |
| validation AUC | {served['validation_series']['auc']:.4f} | {full['validation_series']['auc']:.4f} |
| Brier score (test series) | {ts['calibration']['brier']:.4f} | {tf['calibration']['brier']:.4f} |

- fp16 vs fp32 (SavedModel) test AUC delta: {report['fp16_minus_fp32_test_auc']:+.4f} (see the series-probability shift under Evidence).
- Keras vs fp16 .tflite, max |difference| in probability on validation windows: {report['keras_vs_fp16_max_abs_diff']:.2e}.
- The node's own loader and predictor (`medclf_node.inference.registry` + `predict`) reproduce the recipe's
  series probabilities on all {report['node_parity']['series']} test series (max |difference| {report['node_parity']['max_abs_diff']:.1e}).

{render_evidence(report, manifest, SELECTION_3D)}
## CPU latency per series

The node's predictor (`predict_series`, preprocessing included) on one {shape} phantom series
({spacing} mm), {lat['threads']} thread(s), median of {lat['repeats']} run(s) on the machine that ran the recipe
(2 cores, TensorFlow on {report['threads']} thread(s), shared with other work while it ran):

| artifact | per series | with occlusion heat map | model only | load (incl. warm-up) |
|---|---|---|---|---|
{lat_rows}

## Limitations

- Synthetic data only; nodules are spheres with lobulated edges; no calcifications, masses, effusions,
  motion or metal artefacts. Expect failure on real CT until retrained on real, labelled data.
{shift_limitations(report)}- The {(spec.target_spacing or (0.0, 0.0, 0.0))[1]:g} mm model grid blurs small nodules; expect nodules under
  ~{2 * (spec.target_spacing or (0.0, 0.0, 0.0))[1]:g} mm in diameter to be missed.
- The {(spec.target_spacing or (0.0,))[0]:g} mm slices of the model grid make a 10 mm nodule two or three slices deep.
- Trained from scratch on a CPU budget ({report['training']['epochs_run']} epochs on {tr['windows']} windows; training
  window AUC {_last(report['training']['history'], 'auc')}, validation {report['training']['best_val_window_auc']:.4f}{fit_txt});
  the operating point was chosen on a small synthetic validation split, and the CI above shows how
  little a small test split pins the AUC down.
{_target_line(ts['auc'], report=report)}
## Reproduce

```
{report['command']}{_evidence_command(report)}
```

Deterministic seeds (phantoms, splits, training seed {fit['seed']}); TensorFlow on CPU may still vary in the last digits.
"""
