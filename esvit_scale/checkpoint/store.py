"""The checkpoint folders of a run: write one (collective), find the newest usable one, prune old ones.

Layout of `<output_dir>/checkpoints/`:
    <tag>/                       DeepSpeed's files (model/optimizer shards of every rank)
    <tag>/teacher.pt             the full fp32 teacher (ZeRO 0-2)
    <tag>/teacher_rank<R>.pt     ZeRO-3: rank R's shard of every teacher parameter (restore.read_teacher_weights
                                 puts them together when full weights are wanted: init_from, eval, export)
    <tag>/rank<R>.pt             that rank's RNG states (tensors and plain data)
    <tag>/client_state.pt        epoch, step, loader position, loss centres, config (rank 0)
    <tag>/COMPLETE               written last, after every rank finished: layout and manifest (manifest.py)
    <tag>/REJECTED               the next loss after this checkpoint was not finite: never resumed from
    <tag>_universal/             DeepSpeed's universal copy of <tag>, made to resume it under another layout
    latest                       DeepSpeed's pointer (informational; resume uses COMPLETE markers)
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from esvit_scale.checkpoint.files import BackgroundWriter, CheckpointError, rng_state, save_file
from esvit_scale.checkpoint.manifest import describe_files, find_problems, read_marker, write_marker

log = logging.getLogger(__name__)

REJECTED = "REJECTED"


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _broadcast(obj):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


@torch.no_grad()
def weights_finite(engine, teacher) -> bool:
    """Collective: every rank's local student parameters (its shards at ZeRO-3) and teacher are finite."""
    from esvit_scale.engine.teacher import _local
    tensors = [_local(p) for p in engine.module.parameters()] + [_local(p) for p in teacher.teacher_params]
    # one pass per tensor and no mask: a NaN or inf anywhere makes the sum non-finite (isfinite().all() took 4 s
    # for a Swin-T pair on 2 cores, the sums a fraction of that)
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors if t.numel()]).cpu()
    ok = torch.tensor([float(torch.isfinite(sums).all())])
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


class CheckpointStore:
    def __init__(self, output_dir: str | Path, keep: int, layout: dict, asynchronous: bool = False):
        self.root = Path(output_dir) / "checkpoints"
        self.keep, self.layout, self.asynchronous = keep, layout, asynchronous
        self.pending: Optional[tuple] = None          # the asynchronous save in flight
        self.bad: set[str] = set()           # found damaged at the start of this run: never counted as kept
        self.resumed_from: Optional[Path] = None

    # ------------------------------------------------------------------ reading

    def _listing(self) -> list[tuple[str, Optional[dict]]]:
        """(tag, marker; None if unfinished or rejected), oldest first, as this rank sees them."""
        if not self.root.is_dir():
            return []
        tags = sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and p.name.startswith("step") and not p.name.endswith("_universal"))
        return [(t, None if (self.root / t / REJECTED).is_file() else read_marker(self.root / t)) for t in tags]

    def _folders(self) -> list[tuple[str, Optional[dict]]]:
        """Collective: rank 0's listing, the same on every rank."""
        return _broadcast(self._listing() if _rank() == 0 else None)

    def newest_usable(self) -> Optional[Path]:
        """Collective: the newest complete checkpoint whose files all verify; None if there is none at all.
        Damaged ones are skipped with a warning naming the file; if every one is damaged the run stops."""
        folders = self._folders()
        unfinished = [t for t, m in folders if m is None]
        if unfinished and _rank() == 0:
            log.warning("ignoring unfinished checkpoints (no COMPLETE marker, or REJECTED): %s", ", ".join(unfinished))
        skipped = []
        for tag, marker in reversed([(t, m) for t, m in folders if m is not None]):
            path = self.root / tag
            problems = find_problems(path, marker)
            if problems:
                self.bad.add(tag)
                skipped.append(f"{tag}: {problems[0]}")
                if _rank() == 0:
                    log.warning("skipping checkpoint %s: %s", path, "; ".join(problems))
                continue
            if "files" not in marker and _rank() == 0:
                log.warning("checkpoint %s has no manifest (written by an older version): its files are not "
                            "verified", path)
            self.resumed_from = path
            return path
        if skipped:
            raise CheckpointError(f"no usable checkpoint in {self.root}: every complete one is damaged "
                                  f"({'; '.join(skipped)}). Repair or move them away (a run without checkpoints "
                                  "starts afresh).")
        return None

    def last_good(self, excluding: Optional[str] = None) -> Optional[Path]:
        """The newest complete, not rejected, not damaged checkpoint on disk (no verification: for messages)."""
        tags = [t for t, m in self._listing() if m is not None and t not in self.bad and t != excluding]
        return self.root / tags[-1] if tags else None

    def reject(self, step: int, reason: str) -> Optional[Path]:
        """The checkpoint of `step` (if any) led to `reason`: mark it never to be resumed from. Returns the
        newest checkpoint left to resume from."""
        tag = tag_for(step)
        path = self.root / tag
        if _rank() == 0 and (path / "COMPLETE").is_file():
            (path / REJECTED).write_text(reason + "\n")
            log.warning("marked %s as %s: %s", path, REJECTED, reason)
        return self.last_good(excluding=tag)

    # ------------------------------------------------------------------ writing

    def save(self, step: int, engine, teacher, client_state: dict) -> Path:
        """Collective: every rank calls it. Returns the checkpoint folder. Asynchronous: the state is serialized
        into memory here and written by a thread; the checkpoint is completed by the next save or finish()."""
        self.finish()                                 # at most one save in flight
        path = self.root / tag_for(step)
        if not weights_finite(engine, teacher):
            raise FloatingPointError(f"the weights after step {step} are not finite: checkpoint {path} not written. "
                                     f"Last good checkpoint: {self.last_good() or 'none'}.")
        rank = _rank()
        if rank == 0 and path.exists():              # a leftover of an interrupted or rejected save of this step
            shutil.rmtree(path)
        _barrier()
        writer = BackgroundWriter() if self.asynchronous else None
        engine.checkpoint_engine.writer = writer
        try:
            engine.save_checkpoint(str(self.root), tag=path.name)    # has collectives inside: a failure ends here
        except OSError as e:
            self._failed(path, [str(e)])
        finally:
            engine.checkpoint_engine.writer = None
        error = None
        try:
            save_file(rng_state(), path / f"rank{rank}.pt", writer)
            if teacher.partitioned:                  # each rank its own shard: no rank ever holds the whole teacher
                save_file(teacher.local_state(), path / f"teacher_rank{rank}.pt", writer)
            elif rank == 0:
                save_file(teacher.full_state_dict(), path / "teacher.pt", writer)
            if rank == 0:
                save_file(client_state, path / "client_state.pt", writer)
        except OSError as e:
            error = str(e)
        if writer is not None and error is None:
            writer.start()
            self.pending = (path, step, writer)
            return path
        self._complete(path, step, error)
        return path

    def finish(self) -> None:
        """Collective: wait for the asynchronous save in flight (if any) on every rank and complete it."""
        if self.pending is not None:
            path, step, writer = self.pending
            self.pending = None
            self._complete(path, step, writer.wait())

    def _complete(self, path: Path, step: int, error: Optional[str]) -> None:
        errors = [e for e in _gather(error) if e]           # every rank has finished writing: safe to clean up
        if errors:
            self._failed(path, errors)
        files = describe_files(path)
        if _rank() == 0:
            try:
                write_marker(path, step, self.layout, files)
            except OSError as e:
                self._failed(path, [str(e)])
        _barrier()
        self._prune(newest=path.name)
        _barrier()

    def _failed(self, path: Path, errors: list[str]):
        shutil.rmtree(path, ignore_errors=True)
        raise CheckpointError(f"saving checkpoint {path} failed: {'; '.join(errors)}. Its partial folder was removed; "
                              f"the previous checkpoint {self.last_good() or '(none)'} is untouched.")

    def _prune(self, newest: str) -> None:
        """Collective. Keep the newest `keep` checkpoints and, whatever `keep` says, the newest one before `newest`:
        only the loss of the step after a checkpoint shows its weights are sound, and `newest` has not had that yet."""
        good = [t for t, m in self._folders() if m is not None and t not in self.bad and t <= newest]
        protected = set(good[-self.keep:]) | {t for t in good[-2:-1]}
        for tag in good:
            if tag not in protected and _rank() == 0:
                shutil.rmtree(self.root / tag, ignore_errors=True)
                shutil.rmtree(self.root / (tag + "_universal"), ignore_errors=True)   # restore.universal_copy
