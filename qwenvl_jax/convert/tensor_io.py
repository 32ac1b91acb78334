"""Tensor files without torch: safetensors (the `safetensors` library) and PyTorch `.bin` (read).

Safetensors are read lazily with `safe_open(..., framework="numpy")`, one tensor at a time, and
written shard by shard with `safetensors.numpy.save_file`; bf16 arrives and leaves as
`ml_dtypes.bfloat16`, bit for bit. The library's errors are re-raised naming the file.

`.bin` files are torch's zip format (`torch.save` since 1.6): a pickle `data.pkl` that describes
tensors, plus one raw little-endian file per storage. The reader is hand-written because no
library reads them without torch and without running the pickle's code: a restricted unpickler
knows only the records a state dict needs (`collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter` and the typed storage classes)
and refuses any other global (code a malicious pickle would run). Tensors are read lazily: a
`LazyTensor` holds its storage's zip member and strides, and `.numpy()` materialises it.

A `.bin` file is untrusted input, so every tensor record is checked when the file is opened, before
any storage byte is touched (`_check_record`): size, stride and storage offset are non-negative
integers (torch.save never writes a negative one; numpy would read outside the storage or crash);
the storage's element count agrees with its zip member's size, which lies inside the file and is
stored uncompressed (as torch.save writes it: a compressed member could inflate to any size); the
tensor's last element lies inside its storage; and the materialised tensor is no larger than the
file (a zero stride, as an `expand`ed tensor saved as is, repeats elements, but never beyond the
file's size). Any other layout torch.save writes (transposed views, views at an offset, shared
and expanded storages) loads as torch would read it. Each violation is one `TensorFileError`
naming the file, the tensor and what is wrong. A `data.pkl` longer than MAX_PICKLE_BYTES is not
read at all.

Supported dtypes: float32, bfloat16 (as `ml_dtypes.bfloat16`) and float16; anything else raises
`UnsupportedDtypeError` naming the tensor.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from qwenvl_jax.convert.errors import TensorFileError, UnsupportedDtypeError
from qwenvl_jax.errors import MissingPathError

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


# ----------------------------------------------------------------------------- safetensors
def _open_st(path: str):
    """`safe_open(path)` (numpy); a missing, truncated or corrupt file raises an error naming it."""
    try:
        return safetensors.safe_open(path, framework="numpy")
    except FileNotFoundError:
        raise MissingPathError(f"{path}: no such file") from None
    except (safetensors.SafetensorError, OSError) as e:
        raise TensorFileError(f"{path}: not a readable safetensors file ({e})") from None


def _check_code(path: str, name: str, code: str) -> np.dtype:
    if code not in ST_DTYPES:
        raise UnsupportedDtypeError(
            f"{path}: tensor {name!r} has dtype {code}; supported: {sorted(ST_DTYPES)}"
        )
    return ST_DTYPES[code]


def safetensors_keys(path: str) -> list[str]:
    """Tensor names of a safetensors file, in file order (reads only the header)."""
    return list(safetensors_shapes(path))


def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each tensor of a safetensors file, in file order (reads only the header)."""
    with _open_st(path) as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in _file_order(f)}


def _file_order(f) -> list[str]:
    return f.offset_keys() if hasattr(f, "offset_keys") else f.keys()  # safetensors < 0.6


def _raw_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a file through `safetensors.deserialize` (the whole file in memory).

    Only for a safetensors release whose numpy reader cannot return bfloat16 (it has no numpy
    dtype for BF16); the bytes are viewed as `ml_dtypes.bfloat16`, never converted.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        items = safetensors.deserialize(data)
    except safetensors.SafetensorError as e:
        raise TensorFileError(f"{path}: not a readable safetensors file ({e})") from None
    return {
        name: np.frombuffer(v["data"], _check_code(path, name, v["dtype"])).reshape(v["shape"])
        for name, v in items
    }


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) in file order, one tensor read at a time; bf16 as ml_dtypes.bfloat16.

    Raises:
      UnsupportedDtypeError: a tensor's dtype is not F32 / BF16 / F16 (names the tensor).
      TensorFileError: a truncated or corrupt file (names it).
    """
    raw = None
    with _open_st(path) as f:
        for name in _file_order(f):
            dtype = _check_code(path, name, f.get_slice(name).get_dtype())
            try:
                arr = f.get_tensor(name)
            except TypeError:
                if dtype != BF16:
                    raise
                raw = raw if raw is not None else _raw_tensors(path)
                arr = raw[name]
            except safetensors.SafetensorError as e:
                raise TensorFileError(f"{path}: tensor {name!r} is unreadable ({e})") from None
            if arr.dtype != dtype:
                raise TensorFileError(f"{path}: tensor {name!r} read as {arr.dtype}, not {dtype}")
            yield name, arr


def save_safetensors(
    path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> int:
    """Write one safetensors file (a shard: all its tensors are in memory together).

    Args:
      path: the file; replaced if it exists.
      tensors: name -> float32 / bfloat16 / float16 array (any layout; written C-ordered).
      metadata: the header's `__metadata__` strings (transformers wants {"format": "pt"}).

    Returns:
      the bytes of tensor data written.

    Raises:
      UnsupportedDtypeError: a tensor of another dtype (named).
      TensorFileError: the file could not be written (names it).
    """
    arrays = {}
    for name, a in tensors.items():
        a = np.asarray(a)
        if a.dtype not in ST_CODES:
            raise UnsupportedDtypeError(
                f"{path}: cannot write tensor {name!r} as {a.dtype}; supported: float32,"
                " bfloat16, float16"
            )
        # The library writes `nbytes` from the array's data pointer: it must be contiguous.
        arrays[name] = np.ascontiguousarray(a)
    try:
        # The file's mode as open() gives it (0666 less the umask, or an existing file's own):
        # the library writes a private (0600) temporary file and renames it over `path`.
        with open(path, "ab"):
            mode = os.stat(path).st_mode & 0o7777
        safetensors.numpy.save_file(arrays, path, metadata=dict(metadata or {}))
        os.chmod(path, mode)
    except (safetensors.SafetensorError, OSError) as e:
        raise TensorFileError(f"{path}: could not write ({e})") from None
    return sum(a.nbytes for a in arrays.values())


# ----------------------------------------------------------------------------- torch .bin
# The largest data.pkl read: Qwen-VL's state dict pickles to well under 1 MiB, and the objects a
# pickle builds are bounded by its length.
MAX_PICKLE_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class _Storage:
    member: str  # zip member holding the raw bytes
    dtype: np.dtype | None  # None for a dtype we refuse
    dtype_name: str
    numel: object  # as the pickle gives it; `_check_record` makes sure it is an int >= 0

    @property
    def itemsize(self) -> int:
        return (self.dtype or np.dtype(self.dtype_name)).itemsize


@dataclasses.dataclass
class LazyTensor:
    """A checked tensor record of a `.bin` file, materialised by `.numpy()`."""

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
        if flat.size != self.storage.numel:  # checked at open; the file changed since
            raise TensorFileError(f"{self.zf.filename}: storage of {name!r} has the wrong size")
        # Safe: `_check_record` proved every index offset + sum(i * stride) < numel, strides >= 0.
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.shape,
            strides=tuple(s * dtype.itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view, dtype=dtype)  # a contiguous copy, independent of the zip buffer


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bytes(n: int) -> str:
    """A byte count for a message: exact, with a binary unit when it is large."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n} bytes ({n / size:.1f} {unit})"
    return f"{n} bytes"


def _check_record(zf: zipfile.ZipFile, file_size: int, name: str, record: tuple) -> LazyTensor:
    """A tensor record of the pickle as a LazyTensor, once its layout is proved safe to read.

    Reads only the zip directory, never the storage bytes.

    Raises:
      TensorFileError: the first thing wrong with the record (names the file and the tensor).
    """
    path = zf.filename
    _, storage, offset, shape, stride = record
    where = f"{path}: tensor {name!r}"
    if not isinstance(storage, _Storage):
        raise TensorFileError(f"{where} has no storage record")
    if not (isinstance(shape, tuple) and all(map(_is_int, shape))):
        raise TensorFileError(f"{where} has size {shape!r:.80}; expected a tuple of integers")
    if not (isinstance(stride, tuple) and all(map(_is_int, stride))):
        raise TensorFileError(f"{where} has stride {stride!r:.80}; expected a tuple of integers")
    if not _is_int(offset):
        raise TensorFileError(f"{where} has storage offset {offset!r:.80}; expected an integer")
    if len(shape) != len(stride):
        raise TensorFileError(f"{where} has size {shape} but stride {stride} (lengths differ)")
    if min(shape, default=0) < 0:
        raise TensorFileError(f"{where} has a negative size {shape}")
    if min(stride, default=0) < 0:
        raise TensorFileError(
            f"{where} has a negative stride {stride} (torch.save never writes one)"
        )
    if offset < 0:
        raise TensorFileError(f"{where} has a negative storage offset {offset}")
    numel, itemsize = storage.numel, storage.itemsize
    if not _is_int(numel) or numel < 0:
        raise TensorFileError(f"{where}: its storage has {numel!r:.80} elements")
    member = storage.member[storage.member.rfind("data/") :]  # as torch names it: data/<key>
    claimed = numel * itemsize
    if claimed > file_size:
        raise TensorFileError(
            f"{where}: its storage {member} claims {numel} elements ({_bytes(claimed)}), more"
            f" than the whole file holds ({_bytes(file_size)})"
        )
    try:
        info = zf.getinfo(storage.member)
    except KeyError:
        raise TensorFileError(f"{where}: its storage {member} is not in the archive") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise TensorFileError(
            f"{where}: its storage {member} is compressed (torch.save stores storages"
            " uncompressed; re-save the file with torch.save)"
        )
    if info.file_size != claimed:
        raise TensorFileError(
            f"{where}: its storage {member} claims {numel} elements ({_bytes(claimed)}) but the"
            f" archive stores {_bytes(info.file_size)}"
        )
    count = 1
    for n in shape:
        count *= n
    if count and offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) >= numel:
        raise TensorFileError(
            f"{where} (size {shape}, stride {stride}, storage offset {offset}) reads past its"
            f" storage of {numel} elements"
        )
    if count * itemsize > file_size:
        raise TensorFileError(
            f"{where} (size {shape}, stride {stride}) has {count} elements"
            f" ({_bytes(count * itemsize)}), more than the whole file holds ({_bytes(file_size)})"
        )
    return LazyTensor(zf, storage, offset, shape, stride)


def _member_array(zf: zipfile.ZipFile, member: str, dtype: np.dtype) -> np.ndarray:
    """A stored (uncompressed, as `_check_record` requires) zip member as a flat memory map."""
    info = zf.getinfo(member)
    if info.file_size == 0:  # nothing to map
        return np.zeros(0, dtype)
    with open(zf.filename, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if local[:4] != b"PK\x03\x04":
        raise TensorFileError(f"{zf.filename}: bad local header for {member}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > os.path.getsize(zf.filename):
        raise TensorFileError(f"{zf.filename}: truncated (storage {member} ends past the file)")
    return np.memmap(
        zf.filename, dtype=dtype, mode="r", offset=start, shape=(info.file_size // dtype.itemsize,)
    )


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    # Kept as the pickle gives it: `_check_record` checks it, naming the file and the tensor.
    return ("tensor", storage, storage_offset, size, stride)


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
        return _Storage(f"{self.prefix}data/{key}", dtype, dname, numel)


def read_torch_bin(path: str) -> OrderedDict[str, LazyTensor]:
    """The state dict of a torch zip-format `.bin` file, as name -> LazyTensor (in file order).

    Every record is checked before any storage byte is read (see the module docstring).

    Raises:
      TensorFileError: not a torch zip file (e.g. the pre-1.6 legacy format), a pickle that holds
        anything but a flat dict of tensors, a disallowed global, or a tensor whose size, stride,
        offset or storage is not safe to read (named).
    """
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PK\x03\x04":
            raise TensorFileError(f"{path}: a truncated or corrupt zip file (no central directory)")
        if magic[:1] == b"\x80":  # a pickle protocol opcode: torch.save before 1.6
            raise TensorFileError(
                f"{path}: not a torch zip-format file (the legacy pre-1.6 torch.save format is not"
                " supported; re-save it with torch>=1.6 or convert it to safetensors)"
            )
        raise TensorFileError(f"{path}: not a torch checkpoint (neither a zip nor a pickle)")
    try:
        zf = zipfile.ZipFile(path)
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkls) != 1:
            raise TensorFileError(f"{path}: expected one data.pkl in the archive, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        pkl_size = zf.getinfo(pkls[0]).file_size  # zipfile never inflates past it
        if pkl_size > MAX_PICKLE_BYTES:
            raise TensorFileError(
                f"{path}: its {pkls[0]} is {pkl_size} bytes; a state dict's pickle is far smaller"
                f" (at most {MAX_PICKLE_BYTES} read)"
            )
        with zf.open(pkls[0]) as f:
            obj = _RestrictedUnpickler(f, prefix, path).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError) as e:
        if isinstance(e, TensorFileError):
            raise
        raise TensorFileError(f"{path}: not a readable torch checkpoint ({e})") from None
    if not isinstance(obj, dict):
        raise TensorFileError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    file_size = os.path.getsize(path)
    out: OrderedDict[str, LazyTensor] = OrderedDict()
    for k, v in obj.items():
        if not (isinstance(v, tuple) and len(v) == 5 and v[0] == "tensor"):
            raise TensorFileError(f"{path}: entry {k!r} is not a tensor")
        out[str(k)] = _check_record(zf, file_size, str(k), v)
    return out


def iter_torch_bin(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) of a `.bin` file, one tensor materialised at a time."""
    for name, t in read_torch_bin(path).items():
        yield name, t.numpy(name)
