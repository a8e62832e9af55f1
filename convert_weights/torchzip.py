"""Read and write PyTorch's zip checkpoint format (what `torch.save(state_dict, path)` writes) WITHOUT torch.

Why: TMTV-Net's weights (`e_latest.model`, `r_latest.model`) are `torch.save`d state_dicts. Loading them with
`torch.load` would need torch (not a dependency of clips_jax) and, with `weights_only=False`, executes arbitrary
pickled code. This module parses the container itself and only ever builds numpy arrays.

Format (checked against torch 2.13 with `zipfile` and `pickletools.dis`):

    <prefix>/data.pkl           pickle protocol 2 of an OrderedDict name -> tensor, where each tensor is
                                `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
                                backward_hooks[, metadata])` and `storage` is a persistent id
                                `('storage', torch.FloatStorage, '<key>', 'cpu', numel)`
    <prefix>/data/<key>         raw bytes of storage <key> (uncompressed, 64-byte aligned in torch >= 2.x)
    <prefix>/byteorder          'little' or 'big' (absent in old files: little)
    <prefix>/version            '3\\n' (format version), plus .format_version, .storage_alignment, ...

Safe reading: `SafeUnpickler.find_class` returns only harmless stand-ins for an allow-list
(`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor`, the Float/Half/BFloat16
typed storages and the UntypedStorage forms) and raises `WeightsError` for any other global BEFORE anything is
called; `persistent_load` accepts only `('storage', ...)` records. Nothing from torch is imported or executed.

Writing (`write_state_dict`) emits the same layout with a minimal hand-written protocol-2 pickle, so
`torch.load(path, weights_only=True)` reads the result.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from clips_jax.errors import WeightsError
from clips_jax.fileio import atomic_path

#: numpy dtype of each allowed storage class (little-endian; byte order is applied per file).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # bf16: raw 16-bit words, widened to float32 by bit shifting
    "UntypedStorage": np.dtype("u1"),  # torch 2.x untyped form: bytes (refused later as a non-float tensor)
}
#: PyTorch storage class name written for each numpy float dtype (export).
_STORAGE_OF = {np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage"}
_MAGIC_LEGACY = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled torch legacy magic number


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a torch storage class named in the pickle (never the real class)."""

    name: str
    bf16: bool = False

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    """A storage read from `data/<key>`: a flat numpy array (native byte order) and its type."""

    array: np.ndarray
    type: _StorageType
    key: str


def _bf16_to_f32(words: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16, native order) -> float32 (exact: bf16 is the top half of an fp32)."""
    return (words.astype(np.uint32) << 16).view(np.float32)


class SafeUnpickler(pickle.Unpickler):
    """Unpickler for `data.pkl` of a torch zip checkpoint that can only build dicts of numpy arrays.

    `find_class` maps the allow-list to local, side-effect-free callables and raises `WeightsError` for every
    other global (so `os.system`, `builtins.open`, `torch.nn.Module`, ... are refused before any call).
    """

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, little_endian: bool, source: str):
        super().__init__(file)
        self._zf, self._prefix, self._little, self._source = zf, prefix, little_endian, source
        self._storages: dict[str, _Storage] = {}

    # -- globals -------------------------------------------------------------------------------------------
    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch" and name in ("FloatStorage", "HalfStorage", "BFloat16Storage", "UntypedStorage"):
            return _StorageType(name, bf16=name == "BFloat16Storage")
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType("UntypedStorage")
        if module == "torch" and name.endswith("Storage"):
            raise WeightsError(
                f"{self._source}: tensors of type {name} are not supported; only fp32, fp16 and "
                "bf16 state_dicts are (convert the file with tensor.float() first)"
            )
        raise WeightsError(
            f"{self._source}: refused to load: the pickle references {module}.{name}, which is "
            "not a tensor storage or a dict (only plain state_dicts of fp32/fp16/bf16 tensors "
            "are accepted; nothing in the file was executed)"
        )

    # -- storages ------------------------------------------------------------------------------------------
    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise WeightsError(
                f"{self._source}: refused to load: unexpected persistent record {pid!r:.100} "
                "(only tensor storages are accepted)"
            )
        _, stype, key, _location, numel = pid
        if key in self._storages:
            return self._storages[key]
        entry = f"{self._prefix}data/{key}"
        try:
            raw = self._zf.read(entry)
        except KeyError:
            raise WeightsError(f"{self._source}: damaged checkpoint: storage entry {entry} is missing") from None
        dtype = stype.dtype if self._little else stype.dtype.newbyteorder(">")
        if len(raw) < numel * dtype.itemsize:
            raise WeightsError(
                f"{self._source}: damaged checkpoint: storage {key} has {len(raw)} bytes, "
                f"{numel * dtype.itemsize} expected"
            )
        arr = np.frombuffer(raw, dtype=dtype, count=numel).astype(dtype.newbyteorder("="))
        st = _Storage(arr, stype, key)
        self._storages[key] = st
        return st

    # -- tensors -------------------------------------------------------------------------------------------
    def _rebuild_tensor(self, storage, storage_offset, size, stride, *_rest):
        """Stand-in for torch._utils._rebuild_tensor(_v2): a strided view of the storage, copied to a new
        contiguous numpy array (float32 for bf16 storages). Extra arguments (requires_grad, hooks, metadata)
        are ignored."""
        if not isinstance(storage, _Storage):
            raise WeightsError(
                f"{self._source}: refused to load: tensor built from {type(storage).__name__}, not from a storage"
            )
        ints = lambda t: isinstance(t, tuple) and all(isinstance(v, int) and v >= 0 for v in t)  # noqa: E731
        if not (
            isinstance(storage_offset, int)
            and storage_offset >= 0
            and ints(size)
            and ints(stride)
            and len(size) == len(stride)
        ):
            raise WeightsError(
                f"{self._source}: damaged checkpoint: bad tensor layout for storage "
                f"{storage.key} (offset {storage_offset!r}, size {size!r}, stride {stride!r})"
            )
        n = storage.array.size
        last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else -1
        if last >= n:
            raise WeightsError(
                f"{self._source}: damaged checkpoint: tensor of size {tuple(size)} reaches past "
                f"the end of storage {storage.key} ({n} elements)"
            )
        item = storage.array.itemsize
        base = storage.array[storage_offset:] if all(size) else storage.array[:0]
        view = (
            np.lib.stride_tricks.as_strided(
                base, shape=tuple(size), strides=tuple(s * item for s in stride), writeable=False
            )
            if all(size)
            else np.zeros(size, base.dtype)
        )
        out = np.array(view, copy=True)
        return _bf16_to_f32(out) if storage.type.bf16 else out


def read_state_dict(path: str | os.PathLike) -> "collections.OrderedDict[str, np.ndarray]":
    """Read a `torch.save`d state_dict without torch and without executing pickled code.

    Args:
      path: a PyTorch zip checkpoint (torch >= 1.6 default format) holding a dict name -> tensor.

    Returns:
      OrderedDict name -> numpy array in the file's order; fp32 and bf16 tensors become float32, fp16 stays
      float16 (callers cast). Shapes are PyTorch's (conv weights `(O, I, kD, kH, kW)`).

    Raises:
      WeightsError naming the file for: missing, empty, non-zip or truncated files; the legacy (pre-1.6)
      format; pickles referencing anything outside the allow-list (nothing is executed); top-level objects
      that are not a dict of tensors; tensor dtypes other than fp32/fp16/bf16; damaged storages.
    """
    p = Path(path)
    src = str(p)
    if not p.is_file():
        raise WeightsError(f"{src}: no such file")
    size = p.stat().st_size
    if size == 0:
        raise WeightsError(f"{src}: the file is empty (0 bytes); download it again")
    with open(p, "rb") as f:
        head = f.read(len(_MAGIC_LEGACY))
    if not zipfile.is_zipfile(p):
        if head == _MAGIC_LEGACY:
            raise WeightsError(
                f"{src}: legacy (pre-1.6) PyTorch format is not supported; re-save it with "
                "torch.save(torch.load(f), f) in a recent torch"
            )
        raise WeightsError(
            f"{src}: not a PyTorch zip checkpoint ({size} bytes, no zip directory): the file is "
            "truncated or is not a torch.save file; download it again"
        )
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise WeightsError(
                    f"{src}: not a PyTorch checkpoint (expected one <name>/data.pkl in the zip, found {len(pkls)})"
                )
            prefix = pkls[0][: -len("data.pkl")]
            order = b"little"
            if prefix + "byteorder" in names:
                order = zf.read(prefix + "byteorder").strip()
                if order not in (b"little", b"big"):
                    raise WeightsError(f"{src}: damaged checkpoint: unknown byte order {order[:20]!r}")
            up = SafeUnpickler(io.BytesIO(zf.read(pkls[0])), zf, prefix, order == b"little", src)
            obj = up.load()
    except WeightsError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise WeightsError(
            f"{src}: damaged or truncated checkpoint ({type(e).__name__}: {e}); download it again"
        ) from e
    except (
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        struct.error,
        RecursionError,
        MemoryError,
    ) as e:
        raise WeightsError(f"{src}: damaged or unsupported pickle in checkpoint ({type(e).__name__}: {e})") from e

    if not isinstance(obj, dict):
        raise WeightsError(
            f"{src}: the checkpoint holds a {type(obj).__name__}, not a state_dict (a dict of tensor names to tensors)"
        )
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, np.ndarray):
            raise WeightsError(
                f"{src}: the state_dict entry {k!r} is a {type(v).__name__}, not a tensor "
                "(only plain state_dicts of tensors are accepted)"
            )
        if v.dtype not in (np.float32, np.float16):
            raise WeightsError(f"{src}: tensor {k} has dtype {v.dtype}; only fp32, fp16 and bf16 are supported")
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------


class _PickleWriter:
    """Minimal protocol-2 pickle emitter for exactly the objects torch.save writes for a state_dict."""

    def __init__(self):
        self.buf = bytearray(b"\x80\x02")  # PROTO 2

    def glob(self, module: str, name: str):
        self.buf += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def str(self, s: str):
        b = s.encode("utf-8")
        self.buf += b"X" + struct.pack("<I", len(b)) + b

    def int(self, v: int):
        if 0 <= v < 256:
            self.buf += b"K" + bytes([v])
        elif -(2**31) <= v < 2**31:
            self.buf += b"J" + struct.pack("<i", v)
        else:
            enc = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.buf += b"\x8a" + bytes([len(enc)]) + enc  # LONG1

    def tuple(self, items):
        if not items:
            self.buf += b")"
            return
        self.buf += b"("
        for v in items:
            self.int(v)
        self.buf += b"t"

    def empty_ordered_dict(self):
        self.glob("collections", "OrderedDict")
        self.buf += b")R"  # EMPTY_TUPLE, REDUCE


def _state_dict_pickle(entries: list[tuple[str, np.ndarray]]) -> bytes:
    """data.pkl for `entries` (name, contiguous array); storage i holds entry i."""
    w = _PickleWriter()
    w.empty_ordered_dict()
    for i, (name, arr) in enumerate(entries):
        w.str(name)
        w.glob("torch._utils", "_rebuild_tensor_v2")
        w.buf += b"("  # MARK (args of _rebuild_tensor_v2)
        w.buf += b"("  # MARK (persistent id tuple)
        w.str("storage")
        w.glob("torch", _STORAGE_OF[arr.dtype])
        w.str(str(i))
        w.str("cpu")
        w.int(int(arr.size))
        w.buf += b"tQ"  # TUPLE, BINPERSID
        w.int(0)  # storage offset
        w.tuple(arr.shape)
        strides = [int(s) // arr.itemsize for s in arr.strides] if arr.size else [1] * arr.ndim
        w.tuple(strides)
        w.buf += b"\x89"  # NEWFALSE (requires_grad)
        w.empty_ordered_dict()  # backward_hooks
        w.buf += b"tR"  # TUPLE, REDUCE
        w.buf += b"s"  # SETITEM
    w.buf += b"."
    return bytes(w.buf)


def _write_aligned(zf: zipfile.ZipFile, name: str, data: bytes, align: int = 64) -> None:
    """Store `data` uncompressed with its payload aligned to `align` bytes (as torch does, via extra-field
    padding), so torch can also memory-map the file."""
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_STORED
    offset = zf.fp.tell()
    header = 30 + len(name.encode()) + 4
    pad = (-(offset + header)) % align
    zi.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # id "FB", like PyTorch's writer
    zf.writestr(zi, data)


def write_state_dict(
    path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], *, archive_name: str | None = None
) -> Path:
    """Write `state_dict` (name -> float32/float16 numpy array, PyTorch layout) as a torch zip checkpoint.

    The result is what `torch.save(OrderedDict(...), path)` writes: `torch.load(path, weights_only=True)`
    returns an OrderedDict of tensors with the same names, shapes and values. Written atomically.
    bfloat16 is not written (arrays of other dtypes are cast to float32).
    """
    path = Path(path)
    prefix = (archive_name or path.stem or "archive") + "/"
    entries = []
    for k, v in state_dict.items():
        a = np.asarray(v)
        if a.dtype not in _STORAGE_OF:
            a = a.astype(np.float32)
        entries.append((str(k), np.array(a, dtype=a.dtype.newbyteorder("<"), order="C", copy=True)))
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_aligned(zf, prefix + "data.pkl", _state_dict_pickle(entries))
            _write_aligned(zf, prefix + ".format_version", b"1")
            _write_aligned(zf, prefix + ".storage_alignment", b"64")
            _write_aligned(zf, prefix + "byteorder", b"little")
            for i, (_, a) in enumerate(entries):
                _write_aligned(zf, f"{prefix}data/{i}", a.tobytes())
            _write_aligned(zf, prefix + "version", b"3\n")
    return path
