"""Reading and writing checkpoint files: nothing we load can run code, and every failed write names its file.

Loading: `torch.load(weights_only=True)` everywhere. Our files hold only tensors and plain Python data. DeepSpeed's
files also hold a few small objects of its own (the loss scaler, the ZeRO stage enum, fragment addresses); they are
allowed by name (DEEPSPEED_SAFE_TYPES) and nothing else is. DeepSpeed's engine reads its files through its
`checkpoint_engine`: `use_safe_checkpoint_engine` replaces it with SafeCheckpointEngine. Offline tools that call
`torch.load` themselves (deepspeed.utils.zero_to_fp32) run inside `safe_torch_load()`.
Writing: `torch.save` onto a Python file object, so that a full disk surfaces as OSError(ENOSPC) (a path given
to torch.save turns it into a RuntimeError without errno), then re-raised with the file's name.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import random
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch


_torch_load = torch.load          # the real one, also while safe_torch_load() replaces torch.load


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (unsafe, damaged, or written by an incompatible run)."""


def save_file(obj, path: Path, writer: Optional["BackgroundWriter"] = None) -> None:
    """torch.save to `path` atomically (tmp + rename); OSError names the file and keeps its errno. With a writer,
    `obj` is serialized into memory now (a copy: training may change it from the next step on) and written later."""
    if writer is not None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        writer.add(buffer.getbuffer(), path)
    else:
        _write(lambda f: torch.save(obj, f), path)


def _write(fill, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        cause = _os_error(e)            # torch.save's zip writer raises RuntimeError on its way out of an OSError
        if cause is None:
            raise OSError(errno.EIO, f"{e} (writing checkpoint file {path})") from e
        raise OSError(cause.errno, f"{cause.strerror} (writing checkpoint file {path})") from e


class BackgroundWriter:
    """Writes the serialized files of one checkpoint on a thread while training goes on; wait() returns the first
    error (as save_file words it) or None. A process that dies first leaves the files without their marker."""

    def __init__(self):
        self.jobs: list = []
        self.error: Optional[str] = None
        self.thread: Optional[threading.Thread] = None

    def add(self, data, path: Path) -> None:
        self.jobs.append((data, path))

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for data, path in self.jobs:
            try:
                _write(lambda f: f.write(data), path)
            except OSError as e:
                self.error = str(e)
                return

    def wait(self) -> Optional[str]:
        if self.thread is not None:
            self.thread.join()
        self.jobs = []
        return self.error


def _os_error(e: Optional[BaseException]) -> Optional[OSError]:
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def describe_write_error(e: BaseException, folder: Path) -> str:
    """Why a write failed, with its errno where one can be found. A path given to torch.save (DeepSpeed's own
    writers) loses the errno, so a full file system is then recognised by its free space."""
    import shutil
    cause = _os_error(e)
    if cause is not None:
        return f"{cause} ({errno.errorcode.get(cause.errno, '?')})"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} (ENOSPC, {free} bytes free in {folder}): {e}"
    return str(e)


def load_file(path: Path, map_location="cpu"):
    """torch.load with weights_only=True; a file holding anything else is refused, not unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        with torch.serialization.safe_globals(deepspeed_safe_types()):
            return _torch_load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refusing to load {path}: it holds objects that are not plain data or tensors, "
                              f"and unpickling them could run code ({first}). Nothing was executed.") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint file {path} (damaged or truncated?): {e}") from None


def deepspeed_safe_types() -> list:
    """The non-tensor objects DeepSpeed's checkpoint files hold (seen with 0.19: stage 0-3, fp32/bf16/fp16)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_torch_load():
    """Within: every torch.load (e.g. inside DeepSpeed's offline tools) is load_file's safe load."""
    original = torch.load

    def load(f, map_location=None, **kwargs):
        return load_file(Path(f), map_location=map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def use_safe_checkpoint_engine(engine) -> None:
    """Make a DeepSpeed engine read and write its files through load_file / save_file.

    A write that fails inside `engine.save_checkpoint` (a full disk) does not raise there: DeepSpeed's save has
    barriers after the writes, and a rank leaving it early would leave the others waiting in them, or meet them in
    the wrong collective later. The first error is kept instead (`begin_save` / `end_save`), every later write of
    that save is skipped, and the caller agrees on the outcome with the other ranks once the save has returned."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        writer: Optional[BackgroundWriter] = None          # set by CheckpointStore for an asynchronous save
        error: Optional[str] = None

        def begin_save(self, writer: Optional[BackgroundWriter]) -> None:
            self.writer, self.error = writer, None

        def end_save(self) -> Optional[str]:
            error, self.writer, self.error = self.error, None, None
            return error

        def makedirs(self, path, exist_ok=False):
            try:
                os.makedirs(path, exist_ok=exist_ok)
            except OSError as e:
                self.error = self.error or f"{e} (creating checkpoint folder {path})"

        def save(self, state_dict, path: str):
            if self.error is not None:
                return
            try:
                save_file(state_dict, Path(path), self.writer)
            except OSError as e:
                self.error = str(e)

        def load(self, path: str, map_location=None):
            return load_file(Path(path), map_location=map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise CheckpointError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}: "
                              "only the torch one is wrapped for safe loading")
    engine.checkpoint_engine = SafeCheckpointEngine(None)


# --------------------------------------------------------------------------- RNG states as plain data

def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
