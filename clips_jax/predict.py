"""Whole-body lesion segmentation of PET/CT studies: mask, TMTV report and MIP figure per study.

    clips-predict --input PATH --weights DIR --out DIR [--tta] [--dtype float32|bfloat16]
        [--batch_size N] [--stage_a_only] [--overwrite] [--nodicom_seg] [--noreliability]
        [--review_threshold T] [--save_probabilities]   (or: python -m clips_jax.predict ...)

Examples (convert the TMTV-Net weights once, then segment one study or a folder of studies):

    clips-convert-weights --ensemble e_latest.model --refiner r_latest.model --out weights/tmtv-net
    clips-predict --input studies/ --weights weights/tmtv-net --out results/
    clips-predict --input study_001/ --weights weights/tmtv-net --out results/ --dtype bfloat16 --batch_size 4

PATH is one study folder or a folder of studies (`clips_jax.data.study.find_studies`):
  * a DICOM study folder: a PET (PT, Bq/ml) and a CT series anywhere below it (converted to SUVbw);
  * an autoPET-style NIfTI folder: CTres.nii.gz (or CT.nii.gz) + SUV.nii.gz (+ optional SEG.nii.gz, drawn
    in green on the MIP figure, and meta.json);
  * a folder whose immediate sub-folders are such studies, or, when none is, hold NIfTI studies (autoPET:
    DATA/<patient>/<study date>/) (batch mode: one progress line per study, a failing study is reported and
    the others go on; studies whose outputs all exist are skipped, so re-running a batch resumes; --overwrite
    redoes them).
Per study `<id>` (the study folder's path under PATH, "/" -> "__", made file-name safe: `PETCT_x__<date>`; the
same id clips-prepare and clips-evaluate give it) it writes into --out, each file atomically:
  <id>_SEG.nii.gz     uint8 lesion mask (0/1) on the PET grid (same shape and affine as the PET/SUV image)
  <id>_report.json    TMTV (ml), lesion count, Dmax (mm), SUVmax, SUVmean, TLG, patient meta, model,
                      runtimes per stage, software versions
  <id>_report.md      the same as a readable report
  <id>_mip.png        coronal and sagittal PET MIPs with the mask outline (red)
  <id>_SEG.dcm        DICOM input only (unless --nodicom_seg): the mask as a DICOM SEG in the PET's frame of
                      reference, each frame referencing its PET slice (`clips_jax.data.dicom_seg`)
  <id>_PROB.nii.gz    with --save_probabilities: the lesion probability (float32) on the PET grid
Each report carries a reliability score (1 = reliable) from the ensemble members' disagreement and the voxel
uncertainty, with a review flag and its reasons (`clips_jax.reliability_report`, docs/reliability.md); the MIP
figure shows the uncertainty beside the mask, and a batch ends with the list of studies flagged for review.
Every output carries its provenance (CLIPS-JAX version, sha256 of the weights files, the options) and the
notice "research use only, not for clinical decisions".
Exit status (README, "Command-line convention"): 0 if every study succeeded (or was skipped), 1 if any
failed or on an input error (a weights directory that cannot be used, no study found), 2 on a usage error
(no --weights, a malformed flag). Field definitions, options and memory use: docs/predict.md.

The pipeline is TMTV-Net's two-stage cascade (`inference_fn` in `main/main.py` of qurit-frizi/TMTV-Net, with
its tiled `inference_process_wholebody_3d`): stage A runs the stage-A
network (4-U-Net ensemble, or a single fine-tuned "unet") by tiled inference on the 6 mm grid; stage B
runs the refiner on the native PET grid with the upsampled stage-A probability as 6th channel; the mask is
the argmax. `--stage_a_only` skips the refiner: mask = (stage-A probability upsampled to the PET grid) > 0.5.
The stages are composed here from the same building blocks as `clips_jax.cascade.cascade` (identical
results, tested), so each stage can be timed and the large native-grid arrays freed as soon as possible.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clips_jax import cli
from clips_jax.errors import ConfigError, DataError, WeightsError
from clips_jax.fileio import safe_id

WEIGHTS_HELP = (
    "no --weights given. Get the pretrained TMTV-Net weights: download e_latest.model and r_latest.model from "
    "the Google Drive link in the README of github.com/qurit-frizi/TMTV-Net, convert them with "
    "`python -m convert_weights --ensemble e_latest.model --refiner r_latest.model --out weights/tmtv-net`, "
    "then pass `--weights weights/tmtv-net` (details: docs/weights.md, docs/predict.md)."
)

STAGE_A_NAMES = ("ensemble", "unet")
"""Model names a weights directory may use for the stage-A network, in order of preference."""

OUTPUT_SUFFIXES = {"seg": "_SEG.nii.gz", "json": "_report.json", "md": "_report.md", "png": "_mip.png"}
"""Output file name = `<study id>` + suffix, in the --out folder (the outputs every study gets)."""
PROB_SUFFIX = "_PROB.nii.gz"
"""The lesion probability map of `--save_probabilities` (`<study id>` + suffix)."""
DICOM_SEG_SUFFIX = "_SEG.dcm"
"""The DICOM SEG of a DICOM study (`<study id>` + suffix); not in OUTPUT_SUFFIXES, since NIfTI studies have none."""

Progress = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------------------------------------
# Options and models
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    """Inference settings of one run.

    Attributes:
      tta: average the 8 flip combinations in both stages (8x the time).
      dtype: compute dtype of the networks, "float32" or "bfloat16".
      batch_size: tiles per model call (>= 1).
      stage_a_only: skip the refiner; mask = upsampled stage-A probability > 0.5.
      stage_a_tile, stage_b_tile: tile sizes (z, y, x) in voxels; the step is half the tile (50 % overlap).
        Originals 128x96x96 and 96^3; stage-A tiles must be divisible by 16 (U-Net).
      spacing_mm: stage-A grid spacing (6 mm).
      overwrite: redo studies whose outputs exist (else they are skipped).
      allow_partial_ct: accept a DICOM CT covering less than 90 % of the PET's axial extent (uncovered PET
        slices get air; the report's `input_notes` say how much of the PET the CT covers).
      skip_damaged: leave out DICOM files that cannot be read, with a warning naming each (a slice so missing
        inside a series is still an error); default: the study fails naming the first damaged file.
      dicom_seg: for DICOM input, also write the mask as a DICOM SEG (`<id>_SEG.dcm`); ignored for NIfTI input.
      reliability: compute the study's reliability (member disagreement, voxel uncertainty, score, review flag;
        `clips_jax.reliability_report`) on the stage-A grid; no extra network pass.
      review_threshold: review when the score is below this; None = the weights directory's
        `reliability.json`, else `clips_jax.metrics.reliability.DEFAULT_REVIEW_THRESHOLD`.
      save_probabilities: also write the lesion probability on the PET grid (`<id>_PROB.nii.gz`, float32,
        temperature-scaled when the weights have a temperature), e.g. for calibration in `clips-evaluate`.
    """

    tta: bool = False
    dtype: str = "float32"
    batch_size: int = 1
    stage_a_only: bool = False
    stage_a_tile: tuple[int, int, int] = (128, 96, 96)
    stage_b_tile: tuple[int, int, int] = (96, 96, 96)
    spacing_mm: float = 6.0
    overwrite: bool = False
    allow_partial_ct: bool = False
    skip_damaged: bool = False
    dicom_seg: bool = True
    reliability: bool = True
    review_threshold: float | None = None
    save_probabilities: bool = False

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--dtype {self.dtype!r}: use float32 or bfloat16")
        if int(self.batch_size) < 1:
            raise ConfigError(f"--batch_size {self.batch_size}: need at least 1 tile per call")
        for name in ("stage_a_tile", "stage_b_tile"):
            t = tuple(int(v) for v in getattr(self, name))
            if len(t) != 3 or min(t) < 4:
                raise ConfigError(f"--{name} {getattr(self, name)!r}: need three sizes >= 4 (z, y, x)")
            object.__setattr__(self, name, t)
        if any(v % 16 for v in self.stage_a_tile):
            raise ConfigError(f"--stage_a_tile {self.stage_a_tile}: every size must be divisible by 16 (U-Net)")
        if self.review_threshold is not None and not 0.0 <= self.review_threshold <= 1.0:
            raise ConfigError(f"--review_threshold {self.review_threshold}: the score is in [0, 1]")


@dataclasses.dataclass(frozen=True)
class Models:
    """The networks of one run, as (predictor, params) pairs for `clips_jax.inference.tiled_inference`.

    Attributes:
      stage_a: (predictor, params) of the stage-A network (5 channels at 6 mm -> 2 logits).
      refiner: (predictor, params) of the refiner (6 channels native -> 2 logits), or None.
      info: JSON-friendly description for the report: weights dir, model names/classes/configs, source, and
        "weights_sha256" (`clips_jax.provenance.weights_sha256`, set by `load_models`; absent in memory).
      members: for an `Ensemble` stage A, (predictor, params) of `Ensemble.logits_with_members` (the ensemble's
        2 logits + 2 per member in one pass), else None; n_members: its member count (0 without).
      settings: the weights directory's `reliability.json` ({"temperature", "review_threshold", ...}; {} when
        absent), written by `clips-reliability`.
    """

    stage_a: tuple[Any, Any]
    refiner: tuple[Any, Any] | None
    info: dict
    members: tuple[Any, Any] | None = None
    n_members: int = 0
    settings: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_modules(
        cls, stage_a: Any, refiner: Any | None = None, info: dict | None = None, settings: dict | None = None
    ) -> "Models":
        """Wrap NNX modules (e.g. an `Ensemble`/`UNet` and a `Refiner`) already in memory; `settings` as the
        attribute (the temperature and review threshold of `reliability.json`)."""
        from clips_jax.inference import nnx_predictor
        from clips_jax.model import Ensemble

        def describe(module) -> dict:
            config = getattr(module, "config", {})  # a model's ModelConfig -> plain dict for the JSON report
            return {
                "class": type(module).__name__,
                "config": config.to_json() if hasattr(config, "to_json") else dict(config),
            }

        desc = dict(info or {})
        desc.setdefault("stage_a", describe(stage_a))
        if refiner is not None:
            desc.setdefault("stage_b", describe(refiner))
        is_ens = isinstance(stage_a, Ensemble)
        return cls(
            nnx_predictor(stage_a),
            None if refiner is None else nnx_predictor(refiner),
            desc,
            nnx_predictor(stage_a, "logits_with_members") if is_ens else None,
            int(stage_a.n_members) if is_ens else 0,
            dict(settings or {}),
        )


def load_models(weights_dir: str | Path, *, dtype: str = "float32", stage_a_only: bool = False) -> Models:
    """Load the networks of a CLIPS-JAX weights directory (`clips_jax.model.save_weights` / convert_weights).

    Accepted model sets: {"ensemble", "refiner"} (converted TMTV-Net) or {"unet"} (+ optional "refiner"),
    e.g. a fine-tuned single U-Net. "ensemble" wins over "unet" when both exist.

    Args:
      weights_dir: the directory holding `clips_weights.json`.
      dtype: "float32" or "bfloat16" computation dtype of the networks (parameters stay float32).
      stage_a_only: do not load the refiner (and do not require one).
    Returns:
      `Models`; `info["weights_sha256"]` is the hash of the directory's files (`provenance.weights_sha256`).
    Raises:
      WeightsError (one line) if the directory is not a weights directory, has no stage-A model, has no
      refiner while one is needed, or a checkpoint cannot be restored.
    """
    from clips_jax.model import load_model, read_weights_meta
    from clips_jax.model.layers import model_dtype
    from clips_jax.provenance import weights_sha256
    from clips_jax.reliability_report import read_settings

    d = Path(weights_dir)
    if not d.is_dir():
        raise WeightsError(f"--weights {d}: no such directory; give the folder written by convert_weights")
    meta = read_weights_meta(d)
    names = meta.get("models", {})
    a_name = next((n for n in STAGE_A_NAMES if n in names), None)
    if a_name is None:
        raise WeightsError(f"{d}: no stage-A model (need 'ensemble' or 'unet', found {sorted(names)})")
    if not stage_a_only and "refiner" not in names:
        raise WeightsError(
            f"{d}: no 'refiner' model (found {sorted(names)}); pass --stage_a_only to segment "
            "with the stage-A network alone"
        )
    mdtype = model_dtype(dtype)
    stage_a = load_model(d, a_name, dtype=mdtype)
    refiner = None if stage_a_only else load_model(d, "refiner", dtype=mdtype)
    info = {
        "weights_dir": str(weights_dir),
        "weights_sha256": weights_sha256(d),
        "source": meta.get("source", {}),
        "stage_a": {"name": a_name, **names[a_name]},
    }
    if refiner is not None:
        info["stage_b"] = {"name": "refiner", **names["refiner"]}
    return Models.from_modules(stage_a, refiner, info, read_settings(d))


# ----------------------------------------------------------------------------------------------------------
# The two stages
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Segmentation:
    """Result of `segment`.

    mask: (z, y, x) uint8 {0, 1} on the PET grid. stage_a_prob: (d, h, w) float32 on the coarse grid.
    seconds: wall time per stage {"stage_a": s, "stage_b": s or None}.
    stage_a_spacing_mm: (z, y, x) spacing of the coarse grid (shares voxel 0 with the PET grid).
    members: (n, d, h, w) float32 member probabilities on the coarse grid (an ensemble with
      `options.reliability`), else None. tta: (8, d, h, w) float32 stage-A probability of each flip pass
      (`options.tta` and `options.reliability`), else None.
    prob: (z, y, x) float32 final lesion probability on the PET grid (`options.save_probabilities`), else None.
    """

    mask: np.ndarray
    stage_a_prob: np.ndarray
    seconds: dict
    stage_a_spacing_mm: tuple = (6.0, 6.0, 6.0)
    members: np.ndarray | None = None
    tta: np.ndarray | None = None
    prob: np.ndarray | None = None


def stage_b_input(
    ct_hu: np.ndarray, suv: np.ndarray, cascade_channel: np.ndarray, *, round_fp16: bool = True, slab: int = 16
) -> np.ndarray:
    """The refiner input `(z, y, x, 6)` float32: the 5 channels (rounded to float16 first, as the original
    stage B) + the upsampled stage-A probability. Built in z-slabs of `slab` slices so no full-size
    temporary besides the output is allocated (same values as `cascade.cascade`)."""
    from clips_jax.data.channels import make_channels

    out = np.empty(tuple(suv.shape) + (6,), np.float32)
    dt = np.float16 if round_fp16 else np.float32
    for z0 in range(0, suv.shape[0], slab):
        out[z0 : z0 + slab, ..., :5] = make_channels(ct_hu[z0 : z0 + slab], suv[z0 : z0 + slab], dtype=dt)
    out[..., 5] = cascade_channel
    return out


def segment(
    ct_hu: np.ndarray,
    suv: np.ndarray,
    geometry: Any,
    models: Models,
    options: Options = Options(),
    progress: Progress | None = None,
) -> Segmentation:
    """Run stage A (and B unless `options.stage_a_only`) on one study on its PET grid.

    Args:
      ct_hu, suv: (z, y, x) float32 CT (HU) and SUVbw on `geometry` (a `clips_jax.data.Geometry`).
      models: `Models` (refiner required unless stage_a_only).
      options: `Options`.
      progress: optional `progress(stage, tiles_done, tiles_total)`, stage "A" or "B".
    Returns:
      `Segmentation` (mask uint8 (z, y, x) with `geometry.shape`).
    Raises:
      ConfigError if the refiner is needed but missing; DataError for non-finite inputs.
    """
    from clips_jax.inference import argmax_mask

    if not options.stage_a_only and models.refiner is None:
        raise ConfigError("no refiner loaded; use --stage_a_only or a weights directory with a 'refiner'")
    t0 = time.perf_counter()
    prob6, sp6, channel, members, tta = _stage_a_on_pet_grid(ct_hu, suv, geometry, models, options, progress)
    seconds = {"stage_a": time.perf_counter() - t0, "stage_b": None}
    extra = dict(stage_a_spacing_mm=sp6, members=members, tta=tta)
    if options.stage_a_only:
        prob = _scaled(channel, models) if options.save_probabilities else None
        return Segmentation((channel > 0.5).astype(np.uint8), prob6, seconds, **extra, prob=prob)
    t1 = time.perf_counter()
    volume = stage_b_input(ct_hu, suv, channel)
    del channel
    probs = _stage_b(volume, models, options, progress)
    del volume  # before the post-processing below: only `probs` stays full-size
    mask = argmax_mask(probs)
    prob = _scaled(probs[..., 1], models) if options.save_probabilities else None
    del probs
    seconds["stage_b"] = time.perf_counter() - t1
    return Segmentation(mask, prob6, seconds, **extra, prob=prob)


def _stage_a_on_pet_grid(ct_hu, suv, geometry, models: Models, options: Options, progress: Progress | None):
    """Stage A of `segment`: resample the study to `options.spacing_mm`, make the 5 channels, run the
    ensemble, and bring its lesion probability back to the PET grid.

    Returns `(prob6 (d, h, w) float32 on the coarse grid, its spacing (z, y, x) mm, the probability
    (z, y, x) float32 on `geometry`, member probabilities or None, flip passes or None)` (see `_stage_a`)."""
    from clips_jax.data.case import Case
    from clips_jax.data.channels import make_channels
    from clips_jax.data.resample import resample_case
    from clips_jax.inference import upsample_probability

    coarse = resample_case(Case("predict", ct_hu, suv, None, geometry), options.spacing_mm)
    prob6, members, tta = _stage_a(make_channels(coarse.ct, coarse.suv), models, options, progress)
    sp6 = tuple(float(v) for v in coarse.geometry.spacing_mm)
    channel = upsample_probability(prob6, geometry.shape, geometry.spacing_mm, sp6)
    return prob6, sp6, channel, members, tta


def _stage_b(volume: np.ndarray, models: Models, options: Options, progress: Progress | None) -> np.ndarray:
    """Stage B of `segment`: the refiner over the PET-grid input `volume` `(z, y, x, 6)` float32
    (`stage_b_input`). Returns the class
    probabilities `(z, y, x, 2)` float32."""
    from clips_jax.inference import tiled_inference

    pred_b, params_b = models.refiner
    return tiled_inference(
        volume,
        pred_b,
        params=params_b,
        tile_shape=options.stage_b_tile,
        step=tuple(t // 2 for t in options.stage_b_tile),
        progress=None if progress is None else (lambda d, t: progress("B", d, t)),
        batch_size=options.batch_size,
        dtype=options.dtype,
        tta=options.tta,
    )


def _stage_a(
    volume: np.ndarray, models: Models, options: Options, progress: Progress | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Tiled inference of stage A on the coarse channels `(d, h, w, 5)`: (lesion probability (d, h, w),
    member probabilities (n, d, h, w) or None, flip passes (8, d, h, w) or None), float32.

    With `options.reliability` an ensemble runs as `logits_with_members` (the same network pass gives every
    member; softmax per channel pair) and `--tta` keeps each flip pass's lesion probability."""
    from clips_jax.inference import tiled_inference

    with_members = options.reliability and models.members is not None
    pred, params = models.members if with_members else models.stage_a
    passes: list[np.ndarray] = []
    keep_passes = options.reliability and options.tta
    out = tiled_inference(
        volume,
        pred,
        params=params,
        tile_shape=options.stage_a_tile,
        step=tuple(t // 2 for t in options.stage_a_tile),
        progress=None if progress is None else (lambda d, t: progress("A", d, t)),
        batch_size=options.batch_size,
        dtype=options.dtype,
        tta=options.tta,
        softmax_groups=1 + models.n_members if with_members else 1,
        on_pass=(lambda f, p: passes.append(np.array(p[..., 1]))) if keep_passes else None,
    )
    members = np.moveaxis(out[..., 3::2], -1, 0).copy() if with_members else None
    return np.ascontiguousarray(out[..., 1]), members, np.stack(passes) if keep_passes else None


def _scaled(prob: np.ndarray, models: Models) -> np.ndarray:
    """A lesion probability map temperature-scaled with the weights' temperature (a float32 copy)."""
    from clips_jax.metrics.calibration import apply_temperature

    t = float(models.settings.get("temperature", 1.0) or 1.0)
    return np.array(apply_temperature(prob, t), np.float32)


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def mask_statistics(mask: np.ndarray, suv: np.ndarray, spacing_mm: Sequence[float]) -> dict:
    """The report numbers of a lesion mask (definitions in docs/predict.md).

    Args:
      mask: (z, y, x) lesion mask (> 0 = lesion). suv: (z, y, x) SUVbw on the same grid.
      spacing_mm: (z, y, x) voxel size in mm.
    Returns:
      {"tmtv_ml": voxels x voxel volume / 1000, "lesion_count": 18-connected components,
       "dmax_mm": `clips_jax.metrics.dmax_mm` (largest distance between two lesion voxel centres),
       "suv_max", "suv_mean": over the mask voxels, "tlg": SUVmean x TMTV (SUV x ml), "voxels": int}.
      Empty mask: tmtv 0, count 0, tlg 0, and dmax/suv_max/suv_mean None (undefined).
    """
    from clips_jax.metrics import dmax_mm, label_lesions, volume_ml

    m = np.asarray(mask) > 0
    n_vox = int(np.count_nonzero(m))
    tmtv = volume_ml(m, spacing_mm)
    if n_vox == 0:
        return {
            "tmtv_ml": 0.0,
            "lesion_count": 0,
            "dmax_mm": None,
            "suv_max": None,
            "suv_mean": None,
            "tlg": 0.0,
            "voxels": 0,
        }
    vals = np.asarray(suv)[m].astype(np.float64)
    suv_mean = float(vals.mean())
    return {
        "tmtv_ml": tmtv,
        "lesion_count": label_lesions(m)[1],
        "dmax_mm": float(dmax_mm(m, spacing_mm)),
        "suv_max": float(vals.max()),
        "suv_mean": suv_mean,
        "tlg": suv_mean * tmtv,
        "voxels": n_vox,
    }


_PATIENT_KEYS = (
    "patient_id",
    "patient_sex",
    "patient_birth_date",
    "patient_weight_kg",
    "study_date",
    "injected_dose_bq",
    "injection_time",
    "manufacturer",
    "source",
)


def _fmt(v: Any, digits: int = 2) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def report_markdown(report: dict) -> str:
    """The Markdown report of one study from its JSON dict (see `predict_study`)."""
    from clips_jax import reliability_report as rr

    s, r, p = report["results"], report, report["provenance"]
    notice = p["notice"][:1].upper() + p["notice"][1:]
    digest = p["weights_sha256"] or "none (networks built in memory)"
    lines = [
        f"# Lesion segmentation report: {r['study_id']}",
        "",
        f"**{notice}.** {p['software']}; weights sha256 `{digest}`; options as listed under Model and run.",
        "",
        rr.markdown_headline(r.get("reliability")),
        "",
        f"Input: `{r['input']}`  ",
        f"Mask: `{r['outputs']['seg']}` (PET grid {r['grid']['shape']} voxels "
        f"(z, y, x), spacing {r['grid']['spacing_mm']} mm)" + ("  " if r.get("dicom_seg") else ""),
        *_dicom_seg_lines(r.get("dicom_seg")),
        "",
        "## Results",
        "",
        "| quantity | value | unit |",
        "|---|---|---|",
        f"| TMTV (total metabolic tumour volume) | {_fmt(s['tmtv_ml'], 3)} | ml |",
        f"| lesion count (18-connected components) | {s['lesion_count']} | |",
        f"| Dmax (largest distance between two lesion voxels) | {_fmt(s['dmax_mm'], 1)} | mm |",
        f"| SUVmax in the mask | {_fmt(s['suv_max'])} | g/ml |",
        f"| SUVmean in the mask | {_fmt(s['suv_mean'])} | g/ml |",
        f"| TLG = SUVmean x TMTV | {_fmt(s['tlg'], 1)} | g (SUV x ml) |",
        "",
        *rr.markdown_section(r.get("reliability")),
    ]
    if r.get("input_notes"):
        lines += ["## Input notes", "", *[f"- {n}" for n in r["input_notes"]], ""]
    if r["patient"]:
        lines += ["## Patient and study", "", "| field | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in r["patient"].items()] + [""]
    m = r["model"]
    lines += [
        "## Model and run",
        "",
        f"- weights: `{m.get('weights_dir', 'in memory')}`; stage A: {m['stage_a'].get('name', '')} "
        f"({m['stage_a'].get('class', '')}); stage B: "
        + (
            f"{m['stage_b'].get('name', '')} ({m['stage_b'].get('class', '')})"
            if m.get("stage_b")
            else "skipped (--stage_a_only: mask = stage-A probability > 0.5)"
        ),
        f"- options: {json.dumps(r['options'])}",
        "- runtime (s): " + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in r["seconds"].items()),
        f"- software: {json.dumps(r['software'])}",
        "",
        f"Definitions: docs/predict.md. {notice}; not a medical device.",
        "",
    ]
    return "\n".join(lines)


def _dicom_seg_lines(info: dict | None) -> list[str]:
    """The report line on the DICOM SEG (none for NIfTI input)."""
    if not info:
        return []
    if not info["written"]:
        return [f"DICOM SEG: not written ({info['reason']})"]
    refs = (
        "each frame references its PET slice"
        if info["per_frame_references"]
        else info.get("note", "no per-slice references")
    )
    return [
        f"DICOM SEG: `{info['file']}` ({info['frames']} frame(s), PET series {info['source_series_uid']}, "
        f"frame of reference {info['frame_of_reference_uid']}; {refs})"
    ]


def output_paths(out_dir: str | Path, study_id: str) -> dict[str, Path]:
    """{"seg", "json", "md", "png"} -> path of that output of `study_id` in `out_dir`."""
    return {k: Path(out_dir) / f"{safe_id(study_id)}{v}" for k, v in OUTPUT_SUFFIXES.items()}


def _software() -> dict:
    from importlib import metadata

    import flax
    import jax

    import clips_jax

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "clips_jax": clips_jax.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "pydicom": installed("pydicom"),
        "highdicom": installed("highdicom"),
        "backend": jax.default_backend(),
        "python": sys.version.split()[0],
    }


def _report_options(options: Options) -> dict:
    """The options that shape a study's outputs, as recorded in its report and provenance."""
    return {
        "tta": options.tta,
        "dtype": options.dtype,
        "batch_size": options.batch_size,
        "stage_a_only": options.stage_a_only,
        "stage_a_tile": list(options.stage_a_tile),
        "stage_b_tile": list(options.stage_b_tile),
        "stage_a_spacing_mm": options.spacing_mm,
        "allow_partial_ct": options.allow_partial_ct,
        "skip_damaged": options.skip_damaged,
        "dicom_seg": options.dicom_seg,
        "reliability": options.reliability,
        "review_threshold": options.review_threshold,
        "save_probabilities": options.save_probabilities,
    }


def write_study_dicom_seg(
    study: str | Path, path: Path, mask: np.ndarray, geometry: Any, meta: dict, options: Options, prov: dict
) -> dict | None:
    """The DICOM SEG output of one study (`clips_jax.data.dicom_seg.write_dicom_seg`), for DICOM input only.

    Args:
      study: the study folder; `path`: the SEG file to write (`<id>` + DICOM_SEG_SUFFIX).
      mask: (z, y, x) uint8 mask on `geometry`, the PET grid; `meta`: the loaded Case's meta.
      options: `Options` (`dicom_seg`); `prov`: `clips_jax.provenance.provenance(...)`.
    Returns:
      None for NIfTI input (also an exported DICOM study: its meta says "dicom" but it is read as NIfTI);
      {"written": False, "reason"} with --nodicom_seg, or when the PET headers cannot carry a SEG (e.g. no
      FrameOfReferenceUID: a DataWarning says so, the other outputs are written); else {"written": True,
      "file": name, **write_dicom_seg's summary}.
    """
    from clips_jax.data.study import is_nifti_study

    if meta.get("source") != "dicom" or is_nifti_study(study):  # load_study reads a NIfTI layout first
        return None
    if not options.dicom_seg:
        return _not_written(path, "--nodicom_seg")
    from clips_jax.data.dicom import series_headers
    from clips_jax.data.dicom_seg import seg_obstacle, write_dicom_seg
    from clips_jax.errors import DataWarning

    skipped = meta.get("skipped_files")  # read with --skip_damaged: the same files are left out here
    headers = series_headers(study, meta["pet_series_uid"], exclude=skipped if options.skip_damaged else None)
    problem = seg_obstacle(headers)
    if problem:
        warnings.warn(DataWarning(f"{study}: no DICOM SEG written: {problem}"), stacklevel=2)
        return _not_written(path, problem)
    resampled = bool(meta.get("pet_slices_resampled"))
    info = write_dicom_seg(path, mask, geometry, headers, slices_resampled=resampled, provenance=prov)
    return {"written": True, "file": path.name, **info}


def _not_written(path: Path, reason: str) -> dict:
    """{"written": False, "reason"}; a SEG an earlier run left at `path` is deleted (it would no longer match
    this run's NIfTI mask), and the record says so ("removed_stale": name)."""
    if not path.is_file():
        return {"written": False, "reason": reason}
    path.unlink()
    return {"written": False, "reason": reason, "removed_stale": path.name}


def predict_study(
    study: str | Path,
    out_dir: str | Path,
    models: Models,
    options: Options = Options(),
    progress: Progress | None = None,
    study_id: str | None = None,
) -> dict:
    """Segment one study folder and write its four outputs (atomically) into `out_dir`.

    Args:
      study: a NIfTI or DICOM study folder (`clips_jax.data.study.load_study`).
      out_dir: output folder (created).
      models, options, progress: see `segment`.
      study_id: the id its outputs are named by (`<id>_SEG.nii.gz`, ...); None: the folder's name (`safe_id`).
        A batch passes `clips_jax.data.study.study_id` (autoPET `PETCT_x/<date>` -> `PETCT_x__<date>`).
    Returns:
      the report dict also written as `<id>_report.json` (keys: study_id, input, outputs (+ "dicom_seg" when
      written), grid, patient, results (`mask_statistics`), model, options, seconds (load, stage_a, stage_b,
      report, total; the first study's stage times include compilation), software, provenance
      (`clips_jax.provenance.provenance`), dicom_seg (`write_study_dicom_seg`)).
    Raises:
      DataError for unreadable studies (from the loaders), ConfigError for bad options.
    """
    import clips_jax
    from clips_jax import reliability_report as rr
    from clips_jax.data.nifti import save_nifti
    from clips_jax.data.study import input_notes as study_input_notes
    from clips_jax.fileio import json_safe, write_text_atomic
    from clips_jax.metrics.plots import mip_figure
    from clips_jax.provenance import provenance

    t0 = time.perf_counter()
    case = load_study(study, allow_partial_ct=options.allow_partial_ct, skip_damaged=options.skip_damaged)
    study_id = safe_id(case.case_id if study_id is None else study_id)
    paths = output_paths(out_dir, study_id)
    geometry, suv, truth = case.geometry, case.suv, case.seg
    meta = dict(case.meta)
    ct = case.ct
    del case
    t_load = time.perf_counter() - t0
    seg = segment(ct, suv, geometry, models, options, progress)
    del ct
    t1 = time.perf_counter()
    options_used = _report_options(options)
    prov = provenance(
        software_version=clips_jax.__version__,
        weights_sha256=models.info.get("weights_sha256"),
        options=options_used,
    )
    seg_path = Path(out_dir) / f"{study_id}{DICOM_SEG_SUFFIX}"
    # The DICOM SEG first: it is the output that can still fail on the input's headers, and then nothing
    # of this study is written (a later run retries it).
    dicom_seg = write_study_dicom_seg(study, seg_path, seg.mask, geometry, meta, options, prov)
    save_nifti(paths["seg"], seg.mask, geometry, dtype=np.uint8)
    stats = mask_statistics(seg.mask, suv, geometry.spacing_mm)
    reliability = _study_reliability(seg, geometry, models, options)
    title = f"{study_id}: TMTV {stats['tmtv_ml']:.1f} ml, {stats['lesion_count']} lesion(s)"
    title += rr.batch_note(reliability).replace(",", ";", 1)
    panel = _uncertainty_panel(seg, models, options)
    mip_figure(suv, truth, seg.mask, geometry.spacing_mm, paths["png"], title=title, **panel)
    prob_path = Path(out_dir) / f"{study_id}{PROB_SUFFIX}"
    if seg.prob is not None:
        save_nifti(prob_path, seg.prob, geometry, dtype=np.float32)
    outputs = {k: p.name for k, p in paths.items()}
    if dicom_seg and dicom_seg["written"]:
        outputs["dicom_seg"] = seg_path.name
    if seg.prob is not None:
        outputs["probabilities"] = prob_path.name
    report = {
        "study_id": study_id,
        "input": str(study),
        "outputs": outputs,
        "grid": {"shape": list(geometry.shape), "spacing_mm": [round(float(s), 4) for s in geometry.spacing_mm]},
        "patient": {k: meta[k] for k in _PATIENT_KEYS if meta.get(k) not in (None, "")},
        "input_notes": study_input_notes(meta),
        "results": stats,
        "reliability": reliability,
        "model": models.info,
        "options": options_used,
        "seconds": {"load": t_load, **seg.seconds},
        "software": _software(),
        "provenance": prov,
        "dicom_seg": dicom_seg,
    }
    report["seconds"]["report"] = time.perf_counter() - t1
    report["seconds"]["total"] = time.perf_counter() - t0
    report = json_safe(report)
    write_text_atomic(paths["md"], report_markdown(report))
    write_text_atomic(paths["json"], json.dumps(report, indent=1, allow_nan=False))
    return report


def _study_reliability(seg: Segmentation, geometry: Any, models: Models, options: Options) -> dict | None:
    """The report's `reliability` record (`clips_jax.reliability_report.study_reliability`), None when off."""
    if not options.reliability:
        return None
    from clips_jax.reliability_report import study_reliability

    return study_reliability(
        seg.mask,
        geometry.spacing_mm,
        seg.stage_a_prob,
        seg.stage_a_spacing_mm,
        seg.members,
        seg.tta,
        settings=models.settings,
        threshold=options.review_threshold,
    )


def _uncertainty_panel(seg: Segmentation, models: Models, options: Options) -> dict:
    """`mip_figure` keywords of the uncertainty panel: the entropy of the stage-A probability ({} when off)."""
    if not options.reliability:
        return {}
    from clips_jax.reliability_report import uncertainty_map

    t = float(models.settings.get("temperature", 1.0) or 1.0)
    return {
        "uncertainty": uncertainty_map(seg.stage_a_prob, t),
        "uncertainty_spacing_mm": seg.stage_a_spacing_mm,
        "uncertainty_label": "uncertainty: entropy of p (bits)",
    }


def load_study(path: str | Path, **options):
    """`clips_jax.data.study.load_study` (indirection kept so the loader is imported lazily)."""
    from clips_jax.data.study import load_study as _load

    return _load(path, **options)


# ----------------------------------------------------------------------------------------------------------
# Batch driver and command line
# ----------------------------------------------------------------------------------------------------------


def _tile_progress(stream) -> Progress | None:
    """A one-line tile progress bar on an interactive `stream`, None otherwise (logs stay clean)."""
    if not getattr(stream, "isatty", lambda: False)():
        return None

    def show(stage: str, done: int, total: int) -> None:
        n = 30 * done // max(total, 1)
        stream.write(f"\r  stage {stage} [{'#' * n}{'.' * (30 - n)}] {done}/{total} tiles")
        if done >= total:
            stream.write("\r" + " " * 60 + "\r")
        stream.flush()

    return show


def run_batch(
    input_path: str | Path, out_dir: str | Path, models: Models, options: Options = Options(), out=None, err=None
) -> dict:
    """Segment every study found under `input_path` (`find_studies`), one progress line per study.

    The batch loop is `clips_jax.batch.for_each_case`: `[k/n] <id>: ok, TMTV ...` per study, a failing study
    `[k/n] <id>: FAILED, skipped (<error>)` and the others go on; studies whose outputs exist (the four files,
    and the DICOM SEG for a DICOM study when `options.dicom_seg`) are skipped unless `options.overwrite`.
    Folders under `input_path` that are not studies are listed on `err` with the reason. With
    `options.reliability` each line carries the study's reliability score (", reliability 0.62", "REVIEW" when
    flagged), and the run ends with the list of studies flagged for review, lowest score first (skipped studies
    included, from their report JSON).

    Returns:
      {"ok": [ids], "skipped": [ids], "failed": {id: message}, "not_studies": {folder: why},
       "review": [ids flagged for review]}.
    Raises:
      DataError if no study is found under `input_path`.
    """
    from clips_jax import batch
    from clips_jax import reliability_report as rr
    from clips_jax.data.study import find_studies, skipped_folders

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    studies = find_studies(input_path)
    not_studies = {str(folder): why for folder, why in skipped_folders(input_path, studies)}
    for folder, why in not_studies.items():
        print(f"skipped folder {folder}: {why}", file=err, flush=True)
    progress = _tile_progress(err)
    by_id = _studies_by_id(input_path, studies)
    records: dict[str, dict | None] = {}

    def one_study(sid: str):
        if not options.overwrite and _outputs_complete(by_id[sid], out_dir, sid, options):
            records[sid] = _earlier_reliability(out_dir, sid)
            return batch.skipped("skipped (outputs exist; --overwrite to redo)")
        t0 = time.perf_counter()
        report = predict_study(by_id[sid], out_dir, models, options, progress, study_id=sid)
        s, records[sid] = report["results"], report.get("reliability")
        return batch.done(
            f"ok, TMTV {s['tmtv_ml']:.1f} ml, {s['lesion_count']} lesion(s){rr.batch_note(records[sid])}, "
            f"{time.perf_counter() - t0:.1f} s"
        )

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    outcomes = batch.for_each_case(by_id, one_study, log=say)
    n = outcomes.total
    where = f"outputs in {out_dir}" if Path(out_dir).is_dir() else "no outputs written"
    without = f"; {len(not_studies)} folder(s) without a study" if not_studies else ""
    outcomes.log_summary(
        say,
        f"done: {len(outcomes.done)} ok, {len(outcomes.skipped)} skipped, {len(outcomes.failed)} failed "
        f"of {n} stud{'y' if n == 1 else 'ies'}{without}; {where}",
    )
    for line in rr.review_list(records):
        say(line)
    review = [sid for sid, r in records.items() if r and r["review"]]
    return {
        "ok": outcomes.done,
        "skipped": outcomes.skipped,
        "failed": outcomes.failed,
        "not_studies": not_studies,
        "review": review,
    }


def _earlier_reliability(out_dir: str | Path, sid: str) -> dict | None:
    """The reliability record of a study's existing report JSON (None when absent or unreadable)."""
    try:
        return json.loads(output_paths(out_dir, sid)["json"].read_text()).get("reliability")
    except (OSError, ValueError):
        return None


def _studies_by_id(root: str | Path, studies: list[Path]) -> dict[str, Path]:
    """study id (`clips_jax.data.study.study_id`: the folder's path under `root`, made file-name safe) -> folder;
    DataError naming both folders when two get one id (their outputs would overwrite each other)."""
    from clips_jax.data.study import study_id

    by_id: dict[str, Path] = {}
    for study in studies:
        sid = study_id(root, study)
        if sid in by_id:
            raise DataError(
                f"the studies {by_id[sid]} and {study} get the same study id {sid!r} (and output names); "
                "rename one folder"
            )
        by_id[sid] = study
    return by_id


def _outputs_complete(study: Path, out_dir: str | Path, sid: str, options: Options) -> bool:
    """Whether a study's outputs from an earlier run are all there: the four files of `output_paths`, the
    probability map with `options.save_probabilities`, plus the DICOM SEG for a DICOM study when
    `options.dicom_seg` (so a study done with `--nodicom_seg`, or before SEG output existed, gets its SEG on a
    later run), unless its report says its headers cannot carry one."""
    from clips_jax.data.study import is_nifti_study

    if not all(p.is_file() for p in output_paths(out_dir, sid).values()):
        return False
    if options.save_probabilities and not (Path(out_dir) / f"{sid}{PROB_SUFFIX}").is_file():
        return False
    wants_seg = options.dicom_seg and not is_nifti_study(study)
    if not wants_seg or (Path(out_dir) / f"{sid}{DICOM_SEG_SUFFIX}").is_file():
        return True
    return _seg_impossible(output_paths(out_dir, sid)["json"])


def _seg_impossible(report_path: Path) -> bool:
    """Whether the earlier report says no SEG could be written for the study's headers (e.g. no
    FrameOfReferenceUID): then the study is done, not redone on every run. --nodicom_seg does not count."""
    try:
        info = json.loads(report_path.read_text(encoding="utf-8")).get("dicom_seg") or {}
    except (OSError, ValueError):
        return False
    return info.get("written") is False and info.get("reason") not in (None, "--nodicom_seg")


def define_flags(fv) -> None:
    """Define the command-line flags on the absl `FlagValues` `fv` (global FLAGS or a private one)."""
    from absl import flags

    kw = dict(flag_values=fv)
    flags.DEFINE_string("input", None, "study folder (DICOM PET+CT or autoPET NIfTI) or folder of studies", **kw)
    flags.DEFINE_string(
        "weights",
        None,
        "CLIPS-JAX weights directory (from `python -m convert_weights`); "
        "models {ensemble, refiner} or {unet} (+ optional refiner)",
        **kw,
    )
    flags.DEFINE_string("out", None, "output folder (created)", **kw)
    flags.DEFINE_boolean("tta", False, "test-time augmentation: average the 8 flip combinations (8x slower)", **kw)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "network compute dtype", **kw)
    flags.DEFINE_integer("batch_size", 1, "tiles per model call (more = faster on GPU, more memory)", **kw)
    flags.DEFINE_boolean(
        "stage_a_only",
        False,
        "skip the refiner: mask = stage-A probability > 0.5 on the PET "
        "grid (for a fine-tuned 'unet' weights dir without refiner)",
        **kw,
    )
    flags.DEFINE_boolean("overwrite", False, "redo studies whose outputs exist (default: skip them)", **kw)
    flags.DEFINE_boolean(
        "dicom_seg",
        True,
        "DICOM input: also write the mask as a DICOM SEG (<id>_SEG.dcm) referencing the PET slices; "
        "--nodicom_seg turns it off (NIfTI input never gets one)",
        **kw,
    )
    cli.define_study_flags(fv)
    flags.DEFINE_string(
        "stage_a_tile",
        "128,96,96",
        "(advanced) stage-A tile Z,Y,X voxels at 6 mm, multiples of 16; step = tile / 2",
        **kw,
    )
    flags.DEFINE_string("stage_b_tile", "96,96,96", "(advanced) stage-B tile Z,Y,X voxels; step = tile / 2", **kw)
    flags.DEFINE_boolean(
        "reliability",
        True,
        "per-study reliability score and review flag from the ensemble members' disagreement and the voxel "
        "uncertainty (no extra network pass; docs/reliability.md); --noreliability leaves it out",
        **kw,
    )
    flags.DEFINE_float(
        "review_threshold",
        None,
        "flag a study for review when its reliability score is below this (default: the weights' "
        "reliability.json, else 0.5)",
        **kw,
    )
    flags.DEFINE_boolean(
        "save_probabilities",
        False,
        "also write the lesion probability map <id>_PROB.nii.gz (float32, PET grid), e.g. for the calibration "
        "figures of clips-evaluate",
        **kw,
    )


def run_from_flags(fv, out=None, err=None) -> int:
    """Run with parsed flags `fv`; returns 0 when every study went through, 1 when some failed (a bad flag or
    unusable weights raise: `cli.run_tool` reports them). `out`/`err` default to sys.stdout/sys.stderr."""
    from clips_jax.cli import UsageError, parse_zyx
    from clips_jax.data.study import find_studies

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if not fv["weights"].value:
        raise UsageError(WEIGHTS_HELP)
    if not fv["input"].value or not fv["out"].value:
        raise UsageError("--input and --out are required (see --help)")
    options = Options(
        tta=fv["tta"].value,
        dtype=fv["dtype"].value,
        batch_size=fv["batch_size"].value,
        stage_a_only=fv["stage_a_only"].value,
        overwrite=fv["overwrite"].value,
        **cli.study_options(fv),
        dicom_seg=fv["dicom_seg"].value,
        reliability=fv["reliability"].value,
        review_threshold=fv["review_threshold"].value,
        save_probabilities=fv["save_probabilities"].value,
        stage_a_tile=parse_zyx(fv["stage_a_tile"].value, "stage_a_tile"),
        stage_b_tile=parse_zyx(fv["stage_b_tile"].value, "stage_b_tile"),
    )
    find_studies(fv["input"].value)  # fail before loading weights when the input is wrong
    models = load_models(fv["weights"].value, dtype=options.dtype, stage_a_only=options.stage_a_only)
    options = calibrated_stage_a_tile(options, models.settings, explicit=fv["stage_a_tile"].present)
    result = run_batch(fv["input"].value, fv["out"].value, models, options, out=out, err=err)
    return 1 if result["failed"] else 0


def calibrated_stage_a_tile(options: Options, settings: dict, *, explicit: bool) -> Options:
    """The stage-A tiling that matches the weights' reliability calibration.

    `clips-reliability` fixes the temperature and the review threshold with one stage-A tiling and records it
    in `reliability.json` (`tile_shape`, `tile_step`, voxels (z, y, x); checked by `read_settings`); the
    member disagreement it scores, and the masks themselves, depend on the tiling. Without `--stage_a_tile`
    (`explicit` False) the recorded tile is used, whether or not reliability is on, so that the same weights
    always segment alike. A `DataWarning` says when the calibration cannot carry over: an explicit other tile,
    or a recorded step other than half the tile (the only step `clips-predict` runs). With no recorded tiling,
    `options` is returned as it is.
    """
    from clips_jax.errors import DataWarning
    from clips_jax.reliability_report import SETTINGS_FILE

    if not settings.get("tile_shape"):
        return options
    tile = tuple(int(v) for v in settings["tile_shape"])
    step = tuple(int(v) for v in settings.get("tile_step") or (t // 2 for t in tile))
    if step != tuple(t // 2 for t in tile):
        problem = f"step {step}, which clips-predict does not run (it steps by half the tile); calibrate again"
    elif explicit and tile != tuple(options.stage_a_tile):
        problem = f"tiles {tile}; pass --stage_a_tile {','.join(map(str, tile))} or calibrate again"
    elif not explicit:
        return dataclasses.replace(options, stage_a_tile=tile)
    else:
        return options
    warnings.warn(
        DataWarning(
            f"stage-A tiles {tuple(options.stage_a_tile)}: the weights' reliability calibration ({SETTINGS_FILE}) "
            f"was fixed with {problem}; its scores and review threshold may not carry over"
        ),
        stacklevel=2,
    )
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """`clips-predict`: parse `argv` (as `sys.argv`, program name first; None = sys.argv) on private flags and
    run. Returns the exit status (module docstring); `python -m clips_jax.predict` runs exactly this."""
    from clips_jax.cli import run_tool

    return run_tool(argv, define_flags, run_from_flags, __doc__)


if __name__ == "__main__":
    sys.exit(main())
