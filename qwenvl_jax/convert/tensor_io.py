"""Tensor files without torch: safetensors (read and write, streamed) and PyTorch `.bin` (read).

`.bin` files are torch's zip format (`torch.save` since 1.6): a pickle `data.pkl` that describes
tensors, plus one raw little-endian file per storage. The pickle is read by a restricted unpickler
that only knows the records a state dict needs (`collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter` and the typed storage classes);
any other global (code a malicious pickle would run) is refused. Tensors are read lazily: a
`LazyTensor` holds its storage's zip member and strides, and `.numpy()` materialises it.

Supported dtypes: float32, bfloat16 (as `ml_dtypes.bfloat16`) and float16; anything else raises
`UnsupportedDtypeError` naming the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Iterator

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
# safetensors dtype code <-> numpy dtype, for the dtypes a Qwen-VL checkpoint may hold.
ST_DTYPES = {"F32": np.dtype(np.float32), "BF16": BF16, "F16": np.dtype(np.float16)}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}
# torch typed-storage class names (as pickled by torch.save) -> numpy dtype.
TORCH_STORAGES = {
    "FloatStorage": np.dtype(np.float32),
    "BFloat16Storage": BF16,
    "HalfStorage": np.dtype(np.float16),
}
# Known storage classes whose dtype we refuse, for a clear message (not loaded).
_TORCH_OTHER_STORAGES = {
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


class UnsupportedDtypeError(ValueError):
    """A tensor in a checkpoint file has a dtype other than float32 / bfloat16 / float16."""


class TensorFileError(ValueError):
    """A checkpoint file is malformed or holds something other than a state dict."""


# ----------------------------------------------------------------------------- safetensors
def _read_st_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise TensorFileError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise TensorFileError(f"{path}: implausible safetensors header size {n}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise TensorFileError(f"{path}: safetensors header is not JSON ({e})") from None
    return header, 8 + n


def safetensors_keys(path: str) -> list[str]:
    """Tensor names of a safetensors file (reads only the header)."""
    header, _ = _read_st_header(path)
    return [k for k in header if k != "__metadata__"]


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) in file order; arrays are read-only memory maps of the file.

    Raises:
      UnsupportedDtypeError: a tensor's dtype is not F32 / BF16 / F16 (names the tensor).
      TensorFileError: a malformed header or a tensor whose byte range does not match its shape.
    """
    header, start = _read_st_header(path)
    size = os.path.getsize(path)
    items = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda kv: kv[1]["data_offsets"][0],
    )
    for name, info in items:
        code = info.get("dtype")
        if code not in ST_DTYPES:
            raise UnsupportedDtypeError(
                f"{path}: tensor {name!r} has dtype {code}; supported: {sorted(ST_DTYPES)}"
            )
        dtype = ST_DTYPES[code]
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        if (
            end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            or start + end > size
        ):
            raise TensorFileError(f"{path}: tensor {name!r} byte range does not match {shape}")
        if end == begin:
            yield name, np.zeros(shape, dtype)
            continue
        arr = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
        yield name, arr


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor (header first, so only one tensor is in memory).

    Usage::

        w = SafetensorsWriter(path, [(name, shape, dtype), ...], metadata={"format": "pt"})
        for name, array in ...: w.write(name, array)   # in the declared order
        w.close()
    """

    def __init__(self, path: str, specs: list[tuple[str, tuple, np.dtype]], metadata=None):
        self.path = path
        header: dict = {"__metadata__": dict(metadata or {})}
        offset = 0
        self._order = []
        for name, shape, dtype in specs:
            dtype = np.dtype(dtype)
            if dtype not in ST_CODES:
                raise UnsupportedDtypeError(f"cannot write {name!r} as {dtype}")
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {
                "dtype": ST_CODES[dtype],
                "shape": [int(s) for s in shape],
                "data_offsets": [offset, offset + n],
            }
            self._order.append((name, tuple(int(s) for s in shape), dtype))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0
        self.nbytes = offset

    def write(self, name: str, array: np.ndarray) -> None:
        want_name, shape, dtype = self._order[self._next]
        if name != want_name:
            raise ValueError(f"{self.path}: expected tensor {want_name!r} next, got {name!r}")
        array = np.asarray(array)
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(
                f"{self.path}: tensor {name!r} is {array.shape} {array.dtype}; declared"
                f" {shape} {dtype}"
            )
        if array.dtype.byteorder == ">" or (
            array.dtype.byteorder == "=" and sys.byteorder == "big"
        ):
            array = array.astype(array.dtype.newbyteorder("<"))
        # One C-order pass straight into the file: no intermediate bytes object.
        self._f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            missing = [n for n, _, _ in self._order[self._next :]]
            self._f.close()
            raise ValueError(f"{self.path}: tensors never written: {missing[:5]}")
        self._f.close()


# ----------------------------------------------------------------------------- torch .bin
@dataclasses.dataclass(frozen=True)
class _Storage:
    member: str  # zip member holding the raw bytes
    dtype: np.dtype | None  # None for a dtype we refuse
    dtype_name: str
    numel: int


@dataclasses.dataclass
class LazyTensor:
    """A tensor record of a `.bin` file, materialised by `.numpy()`."""

    zf: zipfile.ZipFile
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self):
        return self.storage.dtype

    def numpy(self, name: str = "?") -> np.ndarray:
        if self.storage.dtype is None:
            raise UnsupportedDtypeError(
                f"{self.zf.filename}: tensor {name!r} has dtype {self.storage.dtype_name};"
                " supported: float32, bfloat16, float16"
            )
        dtype = self.storage.dtype
        flat = _member_array(self.zf, self.storage.member, dtype.newbyteorder("<"))
        if flat.size != self.storage.numel:
            raise TensorFileError(f"{self.zf.filename}: storage of {name!r} has the wrong size")
        if not self.shape:
            return flat[self.offset].copy().astype(dtype)
        need = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        if min(self.shape) > 0 and need >= flat.size:
            raise TensorFileError(f"{self.zf.filename}: tensor {name!r} reads past its storage")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.shape,
            strides=tuple(s * dtype.itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view, dtype=dtype)  # a contiguous copy, independent of the zip buffer


def _member_array(zf: zipfile.ZipFile, member: str, dtype: np.dtype) -> np.ndarray:
    """A zip member as a flat array: memory-mapped when stored uncompressed (torch's case)."""
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED or info.file_size == 0:
        return np.frombuffer(zf.read(member), dtype=dtype)
    with open(zf.filename, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if local[:4] != b"PK\x03\x04":
        raise TensorFileError(f"{zf.filename}: bad local header for {member}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    return np.memmap(
        zf.filename, dtype=dtype, mode="r", offset=start, shape=(info.file_size // dtype.itemsize,)
    )


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _Storage):
        raise TensorFileError("tensor record without a storage")
    return ("tensor", storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    return data


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict; refuses every global outside a short allow-list."""

    def __init__(self, file, prefix: str, path: str):
        super().__init__(file)
        self.prefix = prefix
        self.path = path

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and (name in TORCH_STORAGES or name in _TORCH_OTHER_STORAGES):
            return _StorageType(name)
        raise TensorFileError(
            f"{self.path}: refusing to unpickle {module}.{name} (only torch state-dict tensor"
            " records are allowed in a checkpoint)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TensorFileError(f"{self.path}: unknown persistent record {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise TensorFileError(f"{self.path}: storage of unknown type {stype!r:.80}")
        dtype = TORCH_STORAGES.get(stype.name)
        dname = _TORCH_OTHER_STORAGES.get(stype.name, stype.name)
        return _Storage(f"{self.prefix}data/{key}", dtype, dname, int(numel))


def read_torch_bin(path: str) -> OrderedDict[str, LazyTensor]:
    """The state dict of a torch zip-format `.bin` file, as name -> LazyTensor (in file order).

    Raises:
      TensorFileError: not a torch zip file (e.g. the pre-1.6 legacy format), a pickle that holds
        anything but a flat dict of tensors, or a disallowed global.
    """
    if not zipfile.is_zipfile(path):
        raise TensorFileError(
            f"{path}: not a torch zip-format file (the legacy pre-1.6 torch.save format is not"
            " supported; re-save it with torch>=1.6 or convert it to safetensors)"
        )
    zf = zipfile.ZipFile(path)
    pkls = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pkls) != 1:
        raise TensorFileError(f"{path}: expected one data.pkl in the archive, found {pkls}")
    prefix = pkls[0][: -len("data.pkl")]
    with zf.open(pkls[0]) as f:
        obj = _RestrictedUnpickler(f, prefix, path).load()
    if not isinstance(obj, dict):
        raise TensorFileError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out: OrderedDict[str, LazyTensor] = OrderedDict()
    for k, v in obj.items():
        if not (isinstance(v, tuple) and len(v) == 5 and v[0] == "tensor"):
            raise TensorFileError(f"{path}: entry {k!r} is not a tensor")
        _, storage, offset, shape, stride = v
        out[str(k)] = LazyTensor(zf, storage, offset, shape, stride)
    return out


def iter_torch_bin(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) of a `.bin` file, one tensor materialised at a time."""
    for name, t in read_torch_bin(path).items():
        yield name, t.numpy(name)
