"""SUVbw from the header of one PET DICOM slice: the arithmetic behind `clips_jax.data.dicom`'s SUV conversion.

`suv_parameters(ds)` returns every quantity of the conversion of one slice's values (after RescaleSlope and
RescaleIntercept) to body-weight SUV (SUVbw, g/ml), checked; `suv_factor(ds)` the multiplier alone. The rules are
those of "Comprehensive Manual for SUV Computation and Digital Reference Objects for its Verification" (Vácha,
Hofheinz, Braune, Löck, Zwanenburg), cited below as "oncoray/suv_computation, docs/suv.docx (Vácha et al.), section
<name>" (the file is in <https://github.com/oncoray/suv_computation>), and tests/test_dicom_public.py checks them on
that repository's digital reference objects:

* Units (0054,1001) BQML: SUVbw = value x W / D(t_ref), W the weight in g, D the dose in Bq decayed to the
  reference time that DecayCorrection (0054,1102) START / ADMIN / NONE implies (`suv_factor`);
* GML: SUV already; SUVType (0054,1006) BW or empty is used as is, LBM / LBMJAMES128 / LBMJANMA / IBW are
  converted to SUVbw with PatientWeight (0010,1030), PatientSize (0010,1020) and PatientSex (0010,0040);
* CM2ML (SUVbsa): converted to SUVbw with the Du Bois body surface area;
* CNTS (Philips): the private SUV scale factor (7053,1000), else the activity concentration scale factor
  (7053,1009) followed by the BQML rules;
* RadionuclideTotalDose (0018,1074) recognised as Bq or MBq by its value (`injected_dose_bq`).

Anything else raises DataError naming the series and the tag; accepted guesses raise a DataWarning and are listed
in the parameters' "notes". `clips_jax.data.dicom` re-exports the public names.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import warnings
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import DA, DT, TM

from clips_jax.errors import DataError, DataWarning

MANUAL = "oncoray/suv_computation, docs/suv.docx (Vácha et al.)"

DOSE_BQ_RANGE = (1e6, 1e11)
"""RadionuclideTotalDose (0018,1074) values taken as Bq, the standard's unit: 1 MBq to 100 GBq, every human PET
dose. The manual (section "Radiopharmaceutical dose (D)") says the unit "has to be recognized by its value"; its
FDG histogram (Fig. 2) has two peaks, about 4e2 (MBq) and 4e8 (Bq), and it states no threshold: these ranges split
the six decades between the peaks."""
DOSE_MBQ_RANGE = (1.0, 1e5)
"""Values taken as MBq (with a DataWarning): the same activities, 1 MBq to 100 GBq. A value in neither range
(e.g. 3.7e5, a dose in kBq) is a DataError."""
PATIENT_SIZE_RANGE_M = (0.3, 2.75)
"""Plausible PatientSize (0010,1020), metres; a height in cm (e.g. 175) is refused, not guessed."""
PATIENT_WEIGHT_MAX_KG = 1000.0
"""Above this PatientWeight (0010,1030) is implausible in kg (the manual, section "Patient's weight (W)", reads
such values as grams); body-size conversions refuse it."""
SERIES_SUV_TAGS = ("Units", "DecayCorrection", "PatientWeight", "SUVType")
"""Slice-level tags SUV depends on that must agree across the slices of a PET series (`series_suv_inputs`)."""
RADIOPHARMACEUTICAL_TAGS = (
    "RadionuclideTotalDose",
    "RadiopharmaceuticalStartTime",
    "RadiopharmaceuticalStartDateTime",
    "RadionuclideHalfLife",
)
PHILIPS_CREATOR = "Philips PET Private Group"
PHILIPS_FACTORS = {0x00: "SUV scale factor (7053,1000)", 0x09: "activity concentration scale factor (7053,1009)"}
"""Element offsets in the Philips PET private block (group 7053) -> what they hold."""
GE_CREATOR = "GEMS_PETD_01"
GE_SCAN_DATETIME = 0x0D
"""Offset of the GE PET scan_datetime (0009,100D) in the GE PET private block (group 0009)."""

_SEX_FORMULAS = {
    # SUVType -> (male, female) normaliser in kg from weight w (kg) and height h (cm); manual, section 'Units = "GML"'
    "LBM": (lambda w, h: 1.10 * w - 120.0 * (w / h) ** 2, lambda w, h: 1.07 * w - 148.0 * (w / h) ** 2),
    "LBMJAMES128": (lambda w, h: 1.10 * w - 128.0 * (w / h) ** 2, lambda w, h: 1.07 * w - 148.0 * (w / h) ** 2),
    # Janmahasatian's BMI is in kg/m² (the manual's "H in cm" would make it ~1e-3): h / 100 here.
    "LBMJANMA": (
        lambda w, h: 9270.0 * w / (6680.0 + 216.0 * w / (h / 100.0) ** 2),
        lambda w, h: 9270.0 * w / (8780.0 + 244.0 * w / (h / 100.0) ** 2),
    ),
    "IBW": (lambda w, h: 48.0 + 1.06 * (h - 152.0), lambda w, h: 45.5 + 0.91 * (h - 152.0)),
}
_SUV_TYPE_NAMES = {
    "LBM": "lean body mass (Morgan)",
    "LBMJAMES128": "lean body mass (James / Morgan, 128)",
    "LBMJANMA": "lean body mass (Janmahasatian)",
    "IBW": "ideal body weight",
    "BSA": "body surface area (Du Bois)",
}


# --------------------------------------------------------------------------------------------------------------
# Header values


def _label(ds: Dataset) -> str:
    """Default series name of messages (as `clips_jax.data.dicom` names a PET series)."""
    desc = str(ds.get("SeriesDescription", "")).strip()
    return f"PET series {desc!r} (SeriesInstanceUID {ds.get('SeriesInstanceUID', '?')})"


def _text(ds: Dataset, keyword: str) -> str:
    """The tag's value as stripped text ("" when absent)."""
    return str(ds.get(keyword, "") or "").strip()


def _number(value) -> float | None:
    """`value` (DS/IS/str/bytes) as a finite float, or None if absent or not a number."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").strip("\0 ")
    try:
        f = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return f if f is not None and math.isfinite(f) else None


def _positive(ds: Dataset, keyword: str, tag: str, what: str, where: str) -> float:
    """The tag's value as a float > 0; DataError naming the tag otherwise."""
    v = ds.get(keyword)
    f = _number(v)
    if f is None or f <= 0:
        found = "missing" if v in (None, "") else f"{v!r}"
        raise DataError(
            f"{where}: {what} {keyword} {tag} is {found}; it must be present and > 0 to compute "
            "SUVbw (fix the DICOM header, e.g. set the patient weight)"
        )
    return f


def _datetime(date, time, what: str, where: str) -> _dt.datetime | None:
    """Combine a DICOM DA and TM value into a naive datetime (None if either is absent)."""
    if date in (None, "") or time in (None, ""):
        return None
    try:
        d, t = DA(str(date)), TM(str(time))
        return _dt.datetime.combine(d, _dt.time(t.hour, t.minute, t.second, t.microsecond))
    except (ValueError, TypeError) as e:
        raise DataError(f"{where}: cannot parse {what} date/time {date!r} {time!r} ({e})") from e


def _parse_dt(value, what: str, where: str) -> _dt.datetime:
    """A DICOM DT value as a naive datetime (time zone dropped); DataError naming `what` if unparsable."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").strip("\0 ")
    try:
        return DT(str(value)).replace(tzinfo=None)
    except (ValueError, TypeError) as e:
        raise DataError(f"{where}: cannot parse {what} {value!r} ({e})") from e


def acquisition_datetime(ds: Dataset) -> _dt.datetime | None:
    """AcquisitionDateTime (0008,002A), else AcquisitionDate (0008,0022) (or SeriesDate, StudyDate) +
    AcquisitionTime (0008,0032) of one slice, as a naive datetime (local time of the scanner), or None."""
    if ds.get("AcquisitionDateTime"):
        return _parse_dt(ds.AcquisitionDateTime, "AcquisitionDateTime", _label(ds))
    date = ds.get("AcquisitionDate") or ds.get("SeriesDate") or ds.get("StudyDate")
    return _datetime(date, ds.get("AcquisitionTime"), "acquisition", _label(ds))


def _seconds(ds: Dataset, keyword: str, tag: str, where: str, *, positive: bool) -> float | None:
    """A duration tag in ms (FrameReferenceTime, ActualFrameDuration) in seconds; None if absent; DataError if not
    a number, negative, or (with `positive`) zero."""
    v = ds.get(keyword)
    if v in (None, ""):
        return None
    f = _number(v)
    if f is None or f < 0 or (positive and f == 0):
        raise DataError(f"{where}: {keyword} {tag} is {v!r}; need a {'positive' if positive else '>= 0'} time in ms")
    return f / 1000.0


def _private_value(ds: Dataset, group: int, offset: int, creator: str, vendor: str):
    """(value, note) of the private element `offset` of `creator`'s block in `group`, or (None, None) if absent.

    The block is found through its private creator (gggg,00xx) (DICOM PS3.5 section 7.8.1). An element in block
    10 without any creator (gggg,0010), an invalid encoding that the oncoray DROs use, is read only when
    Manufacturer (0008,0070) names `vendor`, with a note saying so (`_warn_private` warns where it is used); under
    another creator it is not this vendor's element and is ignored.
    """
    try:
        block = ds.private_block(group, creator)
    except KeyError:
        block = None
    if block is not None:
        return (ds[block.get_tag(offset)].value, None) if offset in block else (None, None)
    tag = Tag(group, 0x1000 | offset)
    if tag not in ds or (group, 0x0010) in ds:
        return None, None
    manufacturer = _text(ds, "Manufacturer")
    if not re.match(rf"{vendor}\b", manufacturer, re.IGNORECASE):
        return None, None
    note = (
        f"private element {tag} read without its private creator ({group:04X},0010) {creator!r} "
        f"(Manufacturer {manufacturer!r})"
    )
    return ds[tag].value, note


def _warn_private(note: str | None, where: str) -> None:
    """DataWarning naming the series when a private element used was read without its private creator."""
    if note is not None:
        warnings.warn(DataWarning(f"{where}: {note}"), stacklevel=4)


def _notes(*notes) -> list[str]:
    return [n for n in notes if n]


# --------------------------------------------------------------------------------------------------------------
# Dose and times


def injected_dose_bq(info: Dataset, where: str) -> tuple[float, str, str | None]:
    """(dose in Bq, unit the value was read in: "Bq" or "MBq", note or None) of RadionuclideTotalDose (0018,1074).

    The standard's unit is Bq; the manual (oncoray/suv_computation, docs/suv.docx (Vácha et al.), section
    "Radiopharmaceutical dose (D)") finds doses stored in MBq too and asks to recognise the unit by the value:
    DOSE_BQ_RANGE is read as Bq, DOSE_MBQ_RANGE as MBq (DataWarning naming the series); other values DataError.
    """
    raw = _positive(info, "RadionuclideTotalDose", "(0018,1074)", "injected dose", where)
    if DOSE_BQ_RANGE[0] <= raw <= DOSE_BQ_RANGE[1]:
        return raw, "Bq", None
    if DOSE_MBQ_RANGE[0] <= raw <= DOSE_MBQ_RANGE[1]:
        note = (
            f"RadionuclideTotalDose (0018,1074) {raw:g} is implausible in Bq (the standard's unit; a PET dose is "
            f"{DOSE_BQ_RANGE[0]:g} to {DOSE_BQ_RANGE[1]:g} Bq): assumed to be MBq, {raw * 1e6:g} Bq "
            f'({MANUAL}, section "Radiopharmaceutical dose (D)")'
        )
        warnings.warn(DataWarning(f"{where}: {note}"), stacklevel=3)
        return raw * 1e6, "MBq", note
    raise DataError(
        f"{where}: RadionuclideTotalDose (0018,1074) {raw:g} fits neither Bq ({DOSE_BQ_RANGE[0]:g} to "
        f"{DOSE_BQ_RANGE[1]:g}) nor MBq ({DOSE_MBQ_RANGE[0]:g} to {DOSE_MBQ_RANGE[1]:g}); correct the injected dose "
        "in the header (in Bq)"
    )


def _injection_time(info: Dataset, ref: _dt.datetime, where: str) -> tuple[_dt.datetime, str | None]:
    """(injection datetime, note or None): RadiopharmaceuticalStartDateTime (0018,1078), else
    RadiopharmaceuticalStartTime (0018,1072) on the reference date, or the day before if that would be after
    the reference (injected before midnight: an accepted guess, so a `DataWarning` and a note for the report)."""
    if info.get("RadiopharmaceuticalStartDateTime"):
        return _parse_dt(info.RadiopharmaceuticalStartDateTime, "RadiopharmaceuticalStartDateTime", where), None
    inj = _datetime(ref.strftime("%Y%m%d"), info.get("RadiopharmaceuticalStartTime"), "injection", where)
    if inj is None:
        raise DataError(
            f"{where}: injection time missing (RadiopharmaceuticalStartDateTime (0018,1078) and "
            "RadiopharmaceuticalStartTime (0018,1072)); cannot decay-correct the dose"
        )
    if inj <= ref:
        return inj, None
    note = "injection time (0018,1072) after the scan time on the same day: injection assumed the day before"
    warnings.warn(DataWarning(f"{where}: {note}"), stacklevel=2)
    return inj - _dt.timedelta(days=1), note


def _decay_constant(half_life_s: float) -> float:
    """λ = ln 2 / T½ (1/s)."""
    return math.log(2.0) / half_life_s


def _average_count_time(lam: float, frame_s: float) -> float:
    """Tave = (1/λ) ln(λT / (1 - e^(-λT))) (s): when, after the frame start, the activity equals its mean over a
    frame of T s (manual, section "Decay correction = START", "Determining the reference time")."""
    return math.log(lam * frame_s / -math.expm1(-lam * frame_s)) / lam


def _ge_scan_datetime(ds: Dataset, where: str) -> tuple[_dt.datetime | None, str | None]:
    """(GE PET scan_datetime (0009,100D) of creator GEMS_PETD_01, note) or (None, None)."""
    value, note = _private_value(ds, 0x0009, GE_SCAN_DATETIME, GE_CREATOR, "GE")
    if value in (None, "", b""):
        return None, None
    _warn_private(note, where)
    return _parse_dt(value, "GE PET scan_datetime (0009,100D)", where), note


def _back_computed_start(ds: Dataset, lam: float, where: str) -> _dt.datetime | None:
    """t_ref = t_acq + Tave - Δt from this slice's AcquisitionDate/Time (0008,0022)/(0008,0032), ActualFrameDuration
    (0018,1242) and FrameReferenceTime (0054,1300) (ms), or None when one is missing."""
    acq = acquisition_datetime(ds)
    frame_s = _seconds(ds, "ActualFrameDuration", "(0018,1242)", where, positive=True)
    offset_s = _seconds(ds, "FrameReferenceTime", "(0054,1300)", where, positive=False)
    if acq is None or frame_s is None or offset_s is None:
        return None
    return acq + _dt.timedelta(seconds=_average_count_time(lam, frame_s) - offset_s)


def _start_reference(
    ds: Dataset, lam: float, earliest: _dt.datetime | None, where: str
) -> tuple[_dt.datetime, str, str | None]:
    """(reference time, where it came from, note) of a DecayCorrection START series; see `suv_factor`."""
    acq = earliest or acquisition_datetime(ds)
    series = _datetime(ds.get("SeriesDate") or ds.get("StudyDate"), ds.get("SeriesTime"), "series", where)
    if series is not None and (acq is None or series <= acq):
        return series, "SeriesDate/SeriesTime (0008,0021)/(0008,0031)", None
    ge, note = _ge_scan_datetime(ds, where)
    if ge is not None:
        return ge, "GE PET scan_datetime (0009,100D)", note
    back = _back_computed_start(ds, lam, where)
    if back is not None:
        return back, "AcquisitionTime + Tave(ActualFrameDuration) - FrameReferenceTime", None
    if acq is not None:
        return acq, "earliest AcquisitionDate/AcquisitionTime (0008,0022)/(0008,0032)", None
    raise DataError(
        f"{where}: no SeriesDate/SeriesTime (0008,0021)/(0008,0031) or AcquisitionDate/Time (0008,0022)/(0008,0032); "
        "cannot decay-correct the injected dose"
    )


def _frame_factor(ds: Dataset, lam: float, where: str) -> tuple[float | None, float, str | None]:
    """(frame duration s or None, λT / (1 - e^(-λT)), note) of a DecayCorrection NONE slice: its mean activity
    over the frame relative to the frame start (manual, section "Decay correction = NONE"). Without
    ActualFrameDuration (0018,1242) the factor is 1 (decay during the frame ignored, SUV low by about λT/2),
    with a DataWarning."""
    frame_s = _seconds(ds, "ActualFrameDuration", "(0018,1242)", where, positive=True)
    if frame_s is not None:
        return frame_s, lam * frame_s / -math.expm1(-lam * frame_s), None
    note = (
        "DecayCorrection NONE without ActualFrameDuration (0018,1242): decay during the frame ignored (SUV low by "
        "about ln 2 / half-life x frame duration / 2)"
    )
    warnings.warn(DataWarning(f"{where}: {note}"), stacklevel=4)
    return None, 1.0, note


def _decay_terms(ds: Dataset, info: Dataset, half_life_s: float, earliest, where: str) -> dict[str, Any]:
    """Decay of the dose to the time the pixel values refer to, per DecayCorrection (0054,1102); see `suv_factor`."""
    corr = _text(ds, "DecayCorrection").upper()
    if corr == "ADMIN":  # already decay-corrected to the administration: no decay of the dose
        return {"decay_correction": corr, "decay_s": 0.0, "decay_factor": 1.0, "frame_factor": 1.0, "notes": []}
    lam = _decay_constant(half_life_s)
    if corr == "START":
        ref, source, note = _start_reference(ds, lam, earliest, where)
        frame_s, frame, frame_note = None, 1.0, None
    elif corr == "NONE":  # each slice at its own acquisition
        ref, source, note = acquisition_datetime(ds), "this slice's AcquisitionDate/AcquisitionTime", None
        if ref is None:
            raise DataError(f"{where}: DecayCorrection NONE without AcquisitionDate/Time (0008,0022)/(0008,0032)")
        frame_s, frame, frame_note = _frame_factor(ds, lam, where)
    else:
        found = repr(corr) if corr else "missing"
        raise DataError(f"{where}: DecayCorrection (0054,1102) is {found}; supported: START, ADMIN, NONE")
    inj, day_note = _injection_time(info, ref, where)
    decay_s = (ref - inj).total_seconds()
    if decay_s < 0:
        raise DataError(
            f"{where}: injection {inj.isoformat()} is after the reference time "
            f"{ref.isoformat()}; check the radiopharmaceutical times"
        )
    return {
        "decay_correction": corr,
        "injection_time": inj.isoformat(),
        "reference_time": ref.isoformat(),
        "reference_time_source": source,
        "decay_s": decay_s,
        "decay_factor": 2.0 ** (-decay_s / half_life_s),
        "frame_duration_s": frame_s,
        "frame_factor": frame,
        "notes": _notes(note, day_note, frame_note),
    }


# --------------------------------------------------------------------------------------------------------------
# Units


def _bqml_parameters(ds: Dataset, earliest, where: str) -> dict[str, Any]:
    """Units BQML: SUVbw = value x W x 1000 x frame factor / (D x decay) (W kg, D Bq)."""
    weight = _positive(ds, "PatientWeight", "(0010,1030)", "patient weight", where)
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        raise DataError(
            f"{where}: RadiopharmaceuticalInformationSequence (0054,0016) is missing; need the "
            "injected dose, half-life and injection time to compute SUVbw"
        )
    info = seq[0]
    dose, dose_unit, dose_note = injected_dose_bq(info, where)
    half = _positive(info, "RadionuclideHalfLife", "(0018,1075)", "radionuclide half-life", where)
    decay = _decay_terms(ds, info, half, earliest, where)
    return {
        **decay,
        "units": "BQML",
        "suv_factor": weight * 1000.0 * decay["frame_factor"] / (dose * decay["decay_factor"]),
        "patient_weight_kg": weight,
        "injected_dose_bq": dose,
        "dose_unit_assumed": dose_unit,
        "half_life_s": half,
        "notes": _notes(dose_note, *decay["notes"]),
    }


def _body_size_inputs(ds: Dataset, suv_type: str, where: str) -> tuple[float, float, str]:
    """(PatientWeight kg, PatientSize m, PatientSex) for converting SUV of `suv_type` to SUVbw; DataError naming
    the series, the SUVType and the tag when one is missing or implausible."""
    need = f"SUVType (0054,1006) {suv_type!r} ({_SUV_TYPE_NAMES[suv_type]}) needs"
    weight = _number(ds.get("PatientWeight"))
    if weight is None or not 0 < weight <= PATIENT_WEIGHT_MAX_KG:
        raise DataError(
            f"{where}: {need} PatientWeight (0010,1030) in kg (0 to {PATIENT_WEIGHT_MAX_KG:g}) to convert to "
            f"SUVbw; it is {ds.get('PatientWeight', 'missing')!r}"
        )
    size = _number(ds.get("PatientSize"))
    if size is None or not PATIENT_SIZE_RANGE_M[0] <= size <= PATIENT_SIZE_RANGE_M[1]:
        raise DataError(
            f"{where}: {need} PatientSize (0010,1020), the height in m ({PATIENT_SIZE_RANGE_M[0]:g} to "
            f"{PATIENT_SIZE_RANGE_M[1]:g}), to convert to SUVbw; it is {ds.get('PatientSize', 'missing')!r}"
        )
    sex = _text(ds, "PatientSex").upper()
    if suv_type in _SEX_FORMULAS and sex not in ("M", "F", "O"):
        raise DataError(
            f"{where}: {need} PatientSex (0010,0040) M, F or O to convert to SUVbw; it is {sex or 'missing'!r}"
        )
    return weight, size, sex


def _body_size(suv_type: str, weight_kg: float, size_m: float, sex: str) -> float:
    """The normaliser of `suv_type`: LBM or IBW in kg (PatientSex O: the mean of the male and female formulas,
    as the manual suggests), BSA in m² (Du Bois: 0.007184 x H[cm]^0.725 x W[kg]^0.425)."""
    h_cm = 100.0 * size_m
    if suv_type == "BSA":
        return 0.007184 * h_cm**0.725 * weight_kg**0.425
    male, female = (f(weight_kg, h_cm) for f in _SEX_FORMULAS[suv_type])
    return {"M": male, "F": female}.get(sex, (male + female) / 2.0)


def _normalised_parameters(ds: Dataset, units: str, where: str) -> dict[str, Any]:
    """Units GML or CM2ML: SUV normalised by SUVType (0054,1006), converted to SUVbw.

    oncoray/suv_computation, docs/suv.docx (Vácha et al.), section 'Units = "GML"': SUVType empty or BW is SUVbw
    (factor 1); LBM, LBMJAMES128, LBMJANMA, IBW (g/ml): SUVbw = SUV x W / X, X the lean body mass or ideal body
    weight (kg). Section 'Units = "CM2ML"': SUVType BSA (or empty), SUVbsa in cm²/ml: SUVbw = SUV x W[g] /
    (BSA[m²] x 1e4). Any other pairing of Units and SUVType raises DataError.
    """
    suv_type = _text(ds, "SUVType").upper()
    out = {"units": units, "suv_type": suv_type or None, "decay_correction": _text(ds, "DecayCorrection").upper()}
    if units == "GML" and suv_type in ("", "BW"):
        note = "PET Units GML: the images are SUVbw already; used without conversion"
        return {**out, "suv_factor": 1.0, "notes": [note]}
    if units == "CM2ML" and suv_type == "":
        suv_type = "BSA"  # the manual: CM2ML is the Du Bois SUVbsa, SUVType "should be set to BSA"
    allowed = ("BSA",) if units == "CM2ML" else tuple(_SEX_FORMULAS)
    if suv_type not in allowed:
        raise DataError(
            f"{where}: PET Units (0054,1001) {units} with SUVType (0054,1006) {suv_type!r} is not defined "
            f"(supported: {units} with {', '.join(allowed)}{' or BW' if units == 'GML' else ''}; "
            f'{MANUAL}, section "Voxel values (P) and their unit"); cannot convert to SUVbw'
        )
    weight, size, sex = _body_size_inputs(ds, suv_type, where)
    x = _body_size(suv_type, weight, size, sex)
    if not x > 0:
        raise DataError(
            f"{where}: SUVType (0054,1006) {suv_type!r}: the {_SUV_TYPE_NAMES[suv_type]} of PatientWeight "
            f"(0010,1030) {weight:g} kg and PatientSize (0010,1020) {size:g} m is {x:.3g}; implausible, check both"
        )
    factor = weight * 1000.0 / (x * 1e4) if suv_type == "BSA" else weight / x
    note = (
        f"PET Units {units}, SUVType {suv_type}: converted to SUVbw x {factor:.6g} (PatientWeight {weight:g} kg / "
        f"{_SUV_TYPE_NAMES[suv_type]} {x:.4g} {'m²' if suv_type == 'BSA' else 'kg'})"
    )
    return {
        **out,
        "suv_type": suv_type,
        "suv_factor": factor,
        "patient_weight_kg": weight,
        "patient_size_m": size,
        "body_size": x,
        "notes": [note],
    }


def _philips_factor(ds: Dataset, offset: int, where: str) -> tuple[float | None, str | None]:
    """(Philips PET private scale factor at `offset` of PHILIPS_FACTORS, note); None when absent or 0.0 (Philips:
    "the voxel data cannot be converted"); DataError when not a number or negative."""
    value, note = _private_value(ds, 0x7053, offset, PHILIPS_CREATOR, "Philips")
    if value in (None, "", b""):
        return None, None
    f = _number(value)
    if f is None or f < 0:
        raise DataError(f"{where}: Philips {PHILIPS_FACTORS[offset]} is {value!r}; need a number >= 0")
    if f == 0:
        return None, None
    _warn_private(note, where)
    return f, note


def _counts_parameters(ds: Dataset, earliest, where: str) -> dict[str, Any]:
    """Units CNTS (Philips): oncoray/suv_computation, docs/suv.docx (Vácha et al.), section 'Units = "CNTS"',
    quoting the Philips conformance statement: SUV = value x SUV scale factor (7053,1000), or Bq/ml = value x
    activity concentration scale factor (7053,1009), then converted as Units BQML. The SUV scale factor is used when
    both are present (the direct conversion; the manual found the activity factor only alongside it); a factor of
    0.0 counts as absent. Neither: DataError (the manual's counts-per-second route needs a dose calibration that is
    usually unknown)."""
    decay_corr = _text(ds, "DecayCorrection").upper()
    suv_sf, note = _philips_factor(ds, 0x00, where)
    if suv_sf is not None:
        used = f"PET Units CNTS: SUVbw = value x Philips {PHILIPS_FACTORS[0x00]} {suv_sf:g}"
        return {
            "units": "CNTS",
            "decay_correction": decay_corr,
            "suv_factor": suv_sf,
            "scale_factor": suv_sf,
            "scale_factor_tag": "(7053,1000)",
            "notes": _notes(used, note),
        }
    ac_sf, note = _philips_factor(ds, 0x09, where)
    if ac_sf is None:
        raise DataError(_units_message("CNTS", where))
    p = _bqml_parameters(ds, earliest, where)
    used = f"PET Units CNTS: Bq/ml = value x Philips {PHILIPS_FACTORS[0x09]} {ac_sf:g}, then as BQML"
    return {
        **p,
        "units": "CNTS",
        "suv_factor": p["suv_factor"] * ac_sf,
        "scale_factor": ac_sf,
        "scale_factor_tag": "(7053,1009)",
        "notes": _notes(used, note, *p["notes"]),
    }


def _units_message(units: str, where: str) -> str:
    found = repr(units) if units else "missing"
    counts = (
        f" (this CNTS series has no non-zero Philips {PHILIPS_FACTORS[0x00]} or {PHILIPS_FACTORS[0x09]} of private "
        f"creator {PHILIPS_CREATOR!r})"
        if units == "CNTS"
        else ""
    )
    return (
        f"{where}: PET Units (0054,1001) is {found}; supported are BQML (Bq/ml, converted to SUVbw) and GML or "
        f"CM2ML (SUV, converted to SUVbw), and Philips CNTS with a scale factor{counts}. Export the "
        "attenuation-corrected, quantitative PET series (not counts or a screen capture)"
    )


# --------------------------------------------------------------------------------------------------------------
# Public


_PARAMETER_KEYS = (
    "units",
    "suv_type",
    "suv_factor",
    "patient_weight_kg",
    "patient_size_m",
    "body_size",
    "injected_dose_bq",
    "dose_unit_assumed",
    "half_life_s",
    "decay_correction",
    "injection_time",
    "reference_time",
    "reference_time_source",
    "decay_s",
    "decay_factor",
    "frame_duration_s",
    "frame_factor",
    "scale_factor",
    "scale_factor_tag",
)


def suv_parameters(
    ds: Dataset, *, earliest_acquisition: _dt.datetime | None = None, where: str | None = None
) -> dict[str, Any]:
    """All quantities of the SUVbw conversion of one PET slice header, checked; see `suv_factor`.

    Returns a JSON-friendly dict, keys absent from a conversion None: units (Units (0054,1001)), suv_type (SUVType
    (0054,1006) of GML / CM2ML), suv_factor (SUVbw per value unit), patient_weight_kg, patient_size_m,
    body_size (kg, m² for BSA), injected_dose_bq, dose_unit_assumed ("Bq" or "MBq"), half_life_s, decay_correction,
    injection_time / reference_time (ISO strings), reference_time_source, decay_s, decay_factor (fraction of the
    dose left at the reference time), frame_duration_s and frame_factor (DecayCorrection NONE), scale_factor and
    scale_factor_tag (Philips CNTS), notes (list of str: conversions and assumptions a report should show) and
    note (the notes joined with "; ").
    """
    where = where or _label(ds)
    units = _text(ds, "Units").upper()
    if units == "BQML":
        p = _bqml_parameters(ds, earliest_acquisition, where)
    elif units in ("GML", "CM2ML"):
        p = _normalised_parameters(ds, units, where)
    elif units == "CNTS":
        p = _counts_parameters(ds, earliest_acquisition, where)
    else:
        raise DataError(_units_message(units, where))
    notes = list(p.get("notes", []))
    return {**{k: p.get(k) for k in _PARAMETER_KEYS}, "notes": notes, "note": "; ".join(notes)}


def suv_factor(ds: Dataset, *, earliest_acquisition: _dt.datetime | None = None, where: str | None = None) -> float:
    """Multiplier turning this PET slice's values (after RescaleSlope/Intercept) into SUVbw (g/ml per value unit).

    Units (0054,1001) BQML (oncoray/suv_computation, docs/suv.docx (Vácha et al.), section "Radiopharmaceutical
    dose (D)"): SUVbw = value[Bq/ml] x W[kg] x 1000 / (D[Bq] x 2^(-dt / T½)), W = PatientWeight (0010,1030),
    D = RadionuclideTotalDose (0018,1074) (MBq recognised by its value, `injected_dose_bq`), T½ =
    RadionuclideHalfLife (0018,1075) s, dt = reference - injection time, per DecayCorrection (0054,1102):

      * ADMIN: images decay-corrected to the injection; dt = 0.
      * START (section "Decay correction = START", "Determining the reference time"): the first of
        1. SeriesDate/SeriesTime (0008,0021)/(0008,0031), unless later than the earliest acquisition
           (`earliest_acquisition`, else this slice's AcquisitionDate/Time (0008,0022)/(0008,0032)): then the
           series time was rewritten by post-processing (QIBA option 1);
        2. GE PET scan_datetime (0009,100D), private creator GEMS_PETD_01 (QIBA option 2);
        3. back-computed from this slice: t_ref = t_acq + Tave - Δt, Tave = (1/λ) ln(λT / (1 - e^(-λT))),
           λ = ln 2 / T½, T = ActualFrameDuration (0018,1242), Δt = FrameReferenceTime (0054,1300) (both ms)
           (QIBA option 4, the manual's own proposal "Option B");
        4. the earliest acquisition (QIBA option 3).
        Options 3 and 4 swap places against QIBA's order: the manual warns that the earliest AcquisitionTime
        "may not represent the start of the acquisition" (its DRO_3_2), so it is only the last resort, for series
        without frame timing. The manual's Option B alone (always back-compute) would ignore GE's scan datetime
        and a correct SeriesTime when the acquisition times are rewritten (its DRO_3_3).
      * NONE (section "Decay correction = NONE"): t_ref = this slice's acquisition time, and the decay during
        the frame: SUVbw x λT / (1 - e^(-λT)), T = ActualFrameDuration (0018,1242) in ms / 1000; without it the
        factor is 1 with a DataWarning. Per slice (`read_dicom_study` calls this for each).

    Injection = RadiopharmaceuticalStartDateTime (0018,1078), else RadiopharmaceuticalStartTime (0018,1072) on the
    reference date (the previous day if that would be after the reference). Time zones are ignored.
    Units GML / CM2ML: `_normalised_parameters`; Philips CNTS: `_counts_parameters`.

    Args:
      ds: one PET slice header (pydicom Dataset).
      earliest_acquisition: earliest acquisition datetime of the series (START only), or None.
      where: series/folder label used in messages (default: built from the header).
    Returns:
      the factor (float; g/Bq for BQML, 1/count for CNTS, dimensionless for GML/CM2ML).
    Raises:
      DataError naming the series and tag: unsupported Units or SUVType, PatientWeight / RadionuclideTotalDose /
      RadionuclideHalfLife missing or <= 0, a dose in neither Bq nor MBq, body size missing or implausible, unknown
      DecayCorrection, missing or inconsistent times.
    """
    return float(suv_parameters(ds, earliest_acquisition=earliest_acquisition, where=where)["suv_factor"])


def series_suv_inputs(ds: Dataset) -> dict[str, str]:
    """The series-level SUV inputs of one slice header as text (keyword or tag name -> value), for checking that
    the slices of a series agree: SERIES_SUV_TAGS, the first RadiopharmaceuticalInformationSequence item's
    RADIOPHARMACEUTICAL_TAGS, PatientSize and PatientSex for Units GML / CM2ML, and the Philips scale factors for
    Units CNTS unless DecayCorrection is NONE (then each slice's own factor is applied to it)."""
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    info = seq[0] if seq else Dataset()
    out = {k: _text(ds, k) for k in SERIES_SUV_TAGS} | {k: _text(info, k) for k in RADIOPHARMACEUTICAL_TAGS}
    units = out["Units"].upper()
    if units in ("GML", "CM2ML"):
        out |= {k: _text(ds, k) for k in ("PatientSize", "PatientSex")}
    if units == "CNTS" and out["DecayCorrection"].upper() != "NONE":
        for offset, name in PHILIPS_FACTORS.items():
            value, _ = _private_value(ds, 0x7053, offset, PHILIPS_CREATOR, "Philips")
            out[f"Philips {name}"] = str(value if value is not None else "").strip()
    return out
