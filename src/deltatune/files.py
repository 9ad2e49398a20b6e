"""Safe file reading and writing, shared by adapters, checkpoints, reports and the CLI: atomic
writes (temporary file, fsync, rename), strict JSON objects, and safetensors reads whose every
failure is one clear error. Nothing here ever unpickles."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .core.errors import AdapterFileError

def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, kill_halfway: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename, fsync
    of the folder): a reader sees the old file or the new one, never a mix. The file gets the
    usual permissions (0666 less the umask), not mkstemp's 0600. ``kill_halfway`` is a test
    hook: write half the bytes, then end the process with status 137 as a kill would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if kill_halfway:
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os._exit(137)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def json_type(value: Any) -> str:
    """How JSON calls the type of ``value`` (for messages about a file's contents)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``: every way a file can fail to be one (not a regular file,
    unreadable, not UTF-8, not JSON, nested too deep, not an object) is an ``AdapterFileError``
    naming the file, never a raw ``OSError``/``UnicodeDecodeError``/``RecursionError``."""
    if not path.is_file():
        # a directory, a FIFO (reading it would block) or a dangling link
        raise AdapterFileError(f"{path}: is not a regular file; it must be the adapter's JSON config")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); the file is corrupted or "
                               f"not an adapter config") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise AdapterFileError(f"{path}: not valid JSON (nested too deeply); the file is corrupted") from None
    except ValueError as e:    # JSONDecodeError, and integers longer than Python's digit limit
        raise AdapterFileError(f"{path}: not valid JSON ({e}); the file is corrupted") from None
    if not isinstance(value, dict):
        raise AdapterFileError(f"{path}: holds {json_type(value)}, not a JSON object; the file is corrupted or "
                               f"not an adapter config")
    return value


# Everything that reading a damaged safetensors file can raise: the library's own error, I/O
# errors, and what torch raises for a dtype it cannot represent (safetensors' F4 needs torch's
# packed float4, for instance).
_READ_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError, MemoryError,
                OverflowError)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterFileError(f"{path}: is not a regular file; it must be the adapter's safetensors weights")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors
    except _READ_ERRORS as e:
        raise AdapterFileError(f"{path}: cannot be read as safetensors ({e}); the file is truncated or "
                               f"corrupted: save the adapter again") from None


def check_float_tensor(key: str, t: torch.Tensor, where: Path, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` as ``dtype`` (default: its own), refused unless it is floating point and finite
    after the conversion. An integer or bool tensor where a trained delta belongs is a damaged
    or foreign file (casting it would load garbage), and NaN or Inf would turn every output
    NaN long after the load."""
    if not t.dtype.is_floating_point:
        raise AdapterFileError(f"{where}: tensor {key} has dtype {str(t.dtype).replace('torch.', '')}; adapter "
                               f"tensors must be floating point (float32, float16, bfloat16 or float64)")
    want = dtype or t.dtype
    try:
        out = t.to(want)
        finite = bool(torch.isfinite(out if out.dtype.itemsize > 1 else out.float()).all())
    except (RuntimeError, TypeError) as e:    # torch's packed float4 has no conversion or isfinite
        raise AdapterFileError(f"{where}: tensor {key} has dtype {str(t.dtype).replace('torch.', '')}, which "
                               f"cannot be read as {str(want).replace('torch.', '')} ({e})") from None
    if not finite:
        after = f" after conversion to {str(want).replace('torch.', '')}" if want != t.dtype else ""
        raise AdapterFileError(f"{where}: tensor {key} holds NaN or Inf values{after}; the adapter is corrupted "
                               f"or its training diverged, and it cannot be loaded")
    return out


def warn_casts(where: Path, casts: list[tuple[str, torch.dtype, torch.dtype]]) -> None:
    """One notice per load (not per tensor) for tensors stored in another float dtype than the
    model's: the cast is exact for widening (float16 -> float32) but rounds for narrowing."""
    if not casts:
        return
    groups: dict[tuple[torch.dtype, torch.dtype], list[str]] = {}
    for key, src, dst in casts:
        groups.setdefault((src, dst), []).append(key)
    parts = [f"{len(keys)} tensor(s) from {str(src).replace('torch.', '')} to {str(dst).replace('torch.', '')} "
             f"({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" for (src, dst), keys in groups.items()]
    warnings.warn(f"{where}: cast {'; '.join(parts)} to match the model's dtype", stacklevel=3)

