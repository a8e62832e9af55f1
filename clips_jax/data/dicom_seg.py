"""DICOM output: the lesion mask as a DICOM Segmentation (SEG) instance referencing the source PET series.

`write_dicom_seg` turns the `(z, y, x)` mask on the PET grid (what `dicom.read_dicom_study` returns) into one
binary SEG instance, built with highdicom (https://highdicom.readthedocs.io/en/latest/seg.html), in the PET's
patient, study and Frame of Reference (FrameOfReferenceUID (0020,0052) copied), so a viewer overlays it on the
PET and on every series of the same frame of reference (the CT of a PET/CT).

* One segment, label "lymphoma lesion": category Morphologically Abnormal Structure (SCT 49755003, DICOM PS3.16
  CID 7150), type Lesion (SCT 52988006, CID 7151), algorithm type AUTOMATIC with its identification (name,
  version, family Artificial Intelligence (DCM 123110), parameters: the weights hash and the options).
* Frames. Normally each plane z of the mask is one PET slice: it is matched to the slice at the same position
  along the slice normal (ImagePositionPatient (0020,0032) . normal from ImageOrientationPatient (0020,0037),
  not the file order), the frame takes that slice's position, and references it as its source image
  (Derivation Image functional group, PS3.3 C.7.6.16.2.6, SpatialLocationsPreserved YES). Our mask rows and
  columns are the slices' rows and columns (`dicom.stack_series` stacks `pixel_array`s), so a plane goes in as
  it is.
  When the PET slices were resampled onto a regular grid (irregular slice spacing, `meta["pet_slices_resampled"]`)
  the mask planes are not PET slices: the frames carry the grid's plane positions, orientation and spacing in the
  same frame of reference, and the SEG references the PET series as a whole (ReferencedSeriesSequence) without
  per-frame source images, since no slice was the source of a plane (highdicom adds them only if every plane
  lies on a slice, `_Image._match_planes` in highdicom/image.py; the summary's "per_frame_references" says which).
* Empty planes are omitted (highdicom's default; a plane without a frame has no lesion); a mask without any
  lesion is written with all its frames, because a SEG needs at least one frame.
* Provenance: SeriesDescription and ContentDescription carry the research-use notice, ContentQualification
  (0018,9004) is RESEARCH, SoftwareVersions the CLIPS-JAX version, DeviceSerialNumber the first 16 hex digits
  of the weights hash, AlgorithmParameters (0066,0032) the full hash and the options.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from clips_jax.data.geometry import Geometry
from clips_jax.errors import DataError
from clips_jax.fileio import atomic_path

SEGMENT_LABEL = "lymphoma lesion"
ALGORITHM_NAME = "CLIPS-JAX TMTV-Net"
ALGORITHM_SOURCE = "CLIPS-JAX port of TMTV-Net (github.com/qurit-frizi/TMTV-Net)"
SEG_SERIES_NUMBER = 901
"""SeriesNumber (0020,0011) of the SEG series (a free choice; viewers list series by it)."""

_TYPE2_EMPTY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
"""Patient/study attributes of type 2 (present, may be empty: PS3.3 C.7.1.1, C.7.2.1) that highdicom copies
from the source images; anonymised exports sometimes drop them, so copies of the headers get them empty."""

_LPS = np.diag([-1.0, -1.0, 1.0])
"""Our affines map to RAS (`clips_jax.data.geometry`); DICOM patient coordinates are LPS: x and y negated."""


def seg_obstacle(pet_headers: Sequence[Dataset]) -> str | None:
    """Why no SEG can reference these PET slice headers, or None when one can.

    A SEG needs the source images' StudyInstanceUID, SeriesInstanceUID, SOPClassUID, SOPInstanceUID (type 1)
    and one FrameOfReferenceUID (0020,0052) shared by all slices (the Frame of Reference module is mandatory in
    the PET Image IOD, PS3.3 A.21; some anonymisers remove it).
    """
    if not pet_headers:
        return "no PET slice headers"
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        if any(not str(ds.get(key, "")).strip() for ds in pet_headers):
            return f"a PET slice has no {key}"
    frames = {str(ds.get("FrameOfReferenceUID", "")).strip() for ds in pet_headers}
    if "" in frames:
        return "the PET slices have no FrameOfReferenceUID (0020,0052), so a SEG cannot be placed on them"
    if len(frames) > 1:
        return f"the PET slices have {len(frames)} different FrameOfReferenceUIDs"
    return None


def grid_planes(geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The DICOM plane geometry of a `(z, y, x)` grid.

    Returns:
      (positions (z, 3) float64: ImagePositionPatient of each plane's first pixel, LPS mm;
       orientation (6,): ImageOrientationPatient, direction along a row (increasing x index) then down a column
       (increasing y index), unit vectors, LPS;
       normal (3,): unit normal of the planes, row direction x column direction).
    """
    a = geometry.affine_array
    along_row, down_column = _LPS @ a[:3, 0], _LPS @ a[:3, 1]
    orientation = np.concatenate([along_row / np.linalg.norm(along_row), down_column / np.linalg.norm(down_column)])
    z = np.arange(geometry.shape[0], dtype=np.float64)
    positions = (_LPS @ (a[:3, 2:3] * z[None, :] + a[:3, 3:4])).T
    normal = np.cross(orientation[:3], orientation[3:])
    return positions, orientation, normal


def slices_of_planes(pet_headers: Sequence[Dataset], geometry: Geometry) -> list[Dataset]:
    """The PET slice header of every plane z of `geometry`, matched by position along the slice normal.

    Plane z matches the slice whose ImagePositionPatient lies within half a slice step of the plane along the
    normal; each slice serves one plane. Raises DataError when the slices and the grid's planes do not
    correspond one to one, or differ in orientation or in size (the grid is not these slices' grid).
    """
    positions, orientation, normal = grid_planes(geometry)
    nz, ny, nx = geometry.shape
    step = float(geometry.spacing_mm[0])
    ipp = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in pet_headers], np.float64)
    dist = np.abs((positions @ normal)[:, None] - (ipp @ normal)[None, :])
    best = np.argmin(dist, axis=1)
    if len(pet_headers) != nz or len(set(best.tolist())) != nz or np.any(dist[np.arange(nz), best] > step / 2):
        raise DataError(
            f"PET series {pet_headers[0].get('SeriesInstanceUID', '?')}: its {len(pet_headers)} slices are not the "
            f"{nz} planes of the mask grid; cannot reference them slice by slice"
        )
    chosen = [pet_headers[i] for i in best]
    for ds in chosen:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if not np.allclose(iop, orientation, atol=1e-4) or (int(ds.Rows), int(ds.Columns)) != (ny, nx):
            raise DataError(
                f"PET slice {ds.SOPInstanceUID}: orientation {list(iop)} or size {(ds.Rows, ds.Columns)} differs "
                f"from the mask grid ({list(np.round(orientation, 6))}, {(ny, nx)})"
            )
    return chosen


def write_dicom_seg(
    path: str | os.PathLike,
    mask: np.ndarray,
    geometry: Geometry,
    pet_headers: Sequence[Dataset],
    *,
    slices_resampled: bool,
    provenance: Mapping[str, Any],
) -> dict:
    """Write `mask` as a binary DICOM SEG referencing the PET series of `pet_headers`, atomically.

    Args:
      path: output file (conventionally `<id>_SEG.dcm`), replaced only once complete.
      mask: (z, y, x) lesion mask on `geometry` (> 0 = lesion; uint8 or bool).
      geometry: the PET grid (`Case.geometry` of `dicom.read_dicom_study`).
      pet_headers: the PET series' slice headers (`dicom.series_headers`), any order; pixel data not needed.
      slices_resampled: the PET slices were resampled onto `geometry` (`meta["pet_slices_resampled"]`): no
        per-frame source references (module docstring).
      provenance: `clips_jax.provenance.provenance(...)`: software_version, weights_sha256, options, notice.
    Returns:
      {"frames": number of frames written, "per_frame_references": whether every frame references its PET
       slice, "frame_of_reference_uid", "series_instance_uid", "sop_instance_uid" (of the SEG),
       "source_series_uid" (the PET series), "note" (when the slices were resampled and the frames therefore
       reference the series only)}.
    Raises:
      DataError naming the PET series: `seg_obstacle`, a mask not on `geometry`, slices that do not match the
      grid, or highdicom refusing the headers.
    """
    import highdicom as hd

    where = f"PET series {pet_headers[0].get('SeriesInstanceUID', '?') if pet_headers else '?'}"
    problem = seg_obstacle(pet_headers)
    if problem:
        raise DataError(f"{where}: {problem}")
    mask = np.asarray(mask)
    if mask.shape != tuple(geometry.shape):
        raise DataError(f"{where}: mask shape {mask.shape} is not the PET grid {geometry.shape} (z, y, x)")
    planes = (mask > 0).astype(np.uint8)
    sources = [_with_type2(ds) for ds in pet_headers]
    if slices_resampled:
        normal = grid_planes(geometry)[2]
        sources.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, np.float64) @ normal))
        spatial = _grid_spatial(geometry)
    else:
        sources, spatial = slices_of_planes(sources, geometry), {}
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=planes,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_segment_description(provenance)],
            omit_empty_frames=bool(planes.any()),
            **_instance_attributes(provenance),
            **spatial,
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{where}: cannot build the DICOM SEG ({type(e).__name__}: {e})") from e
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    summary = {
        "frames": int(seg.NumberOfFrames),
        "per_frame_references": _every_frame_referenced(seg),
        "frame_of_reference_uid": str(seg.FrameOfReferenceUID),
        "series_instance_uid": str(seg.SeriesInstanceUID),
        "sop_instance_uid": str(seg.SOPInstanceUID),
        "source_series_uid": str(sources[0].SeriesInstanceUID),
    }
    if slices_resampled and not summary["per_frame_references"]:
        summary["note"] = (
            "the PET slices were resampled onto a regular grid (irregular spacing): the SEG frames lie on that "
            "grid in the PET's frame of reference and reference the PET series, not individual slices"
        )
    return summary


def _with_type2(ds: Dataset) -> Dataset:
    """A copy of a slice header with the type-2 patient/study attributes highdicom copies present (empty if
    absent)."""
    out = copy.deepcopy(ds)
    for key in _TYPE2_EMPTY:
        if key not in out:
            setattr(out, key, "")
    return out


def _grid_spatial(geometry: Geometry) -> dict:
    """highdicom's plane positions, orientation and pixel measures of the planes of `geometry`."""
    import highdicom as hd

    positions, orientation, _ = grid_planes(geometry)
    sz, sy, sx = geometry.spacing_mm
    patient = hd.CoordinateSystemNames.PATIENT
    return {
        "plane_positions": [hd.PlanePositionSequence(patient, image_position=tuple(p)) for p in positions],
        "plane_orientation": hd.PlaneOrientationSequence(patient, image_orientation=tuple(orientation)),
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=(sy, sx), slice_thickness=sz, spacing_between_slices=sz
        ),
    }


def _segment_description(provenance: Mapping[str, Any]):
    """The one segment: lymphoma lesion, found automatically by CLIPS-JAX TMTV-Net."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        version=str(provenance["software_version"]),
        family=codes.cid7162.ArtificialIntelligence,
        source=ALGORITHM_SOURCE,
        parameters={
            "weights_sha256": str(provenance.get("weights_sha256") or "none (networks built in memory)"),
            "options": json.dumps(provenance.get("options", {}), sort_keys=True, separators=(",", ":")),
        },
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.cid7151.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def _instance_attributes(provenance: Mapping[str, Any]) -> dict:
    """Series/instance UIDs, equipment and the research-use descriptions of the SEG instance."""
    import highdicom as hd

    version = str(provenance["software_version"])
    digest = provenance.get("weights_sha256")
    return {
        "series_instance_uid": hd.UID(),
        "series_number": SEG_SERIES_NUMBER,
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": "CLIPS-JAX",
        "manufacturer_model_name": ALGORITHM_NAME,
        "software_versions": version,
        "device_serial_number": digest[:16] if digest else "in-memory",
        "series_description": f"CLIPS-JAX lesions, {provenance['notice']}"[:64],
        "content_description": str(provenance["notice"])[:64],
        "content_label": "LESIONS",
        "content_qualification": hd.ContentQualificationValues.RESEARCH,
    }


def _every_frame_referenced(seg: Dataset) -> bool:
    """Whether every frame of `seg` names a source image in its Derivation Image functional group."""
    for item in seg.PerFrameFunctionalGroupsSequence:
        derivations = item.get("DerivationImageSequence") or []
        if not any(d.get("SourceImageSequence") for d in derivations):
            return False
    return True
