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

from esvit_scale.checkpoint.files import BackgroundWriter, CheckpointError, rng_state, save_file
from esvit_scale.checkpoint.manifest import describe_files, find_problems, read_marker, write_marker
from esvit_scale.engine import collectives

log = logging.getLogger(__name__)

REJECTED = "REJECTED"


def tag_for(step: int) -> str:
    return f"step{step:09d}"


@torch.no_grad()
def weights_finite(parts) -> bool:
    """Collective: every rank's local student parameters (its shards at ZeRO-3) and teacher are finite."""
    from esvit_scale.engine.teacher import _local
    tensors = [_local(p) for p in parts.engine.module.parameters()] + [_local(p) for p in parts.teacher.teacher_params]
    # one pass per tensor and no mask: a NaN or inf anywhere makes the sum non-finite (isfinite().all() took 4 s
    # for a Swin-T pair on 2 cores, the sums a fraction of that)
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors if t.numel()]).cpu()
    return collectives.every_rank(bool(torch.isfinite(sums).all()))


class CheckpointStore:
    def __init__(self, output_dir: str | Path, keep: int, layout: dict, asynchronous: bool = False):
        self.root = Path(output_dir) / "checkpoints"
        self.keep, self.layout, self.asynchronous = keep, layout, asynchronous
        self.pending: Optional[tuple] = None          # the asynchronous save in flight
        self.bad: dict[str, str] = {}        # tag -> what is wrong, for those found damaged: never counted as kept

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
        return collectives.broadcast_object(self._listing() if collectives.rank() == 0 else None)

    def newest_usable(self) -> Optional[Path]:
        """Collective: the newest complete checkpoint whose files all verify; None if there is none at all.
        Damaged ones are skipped with a warning naming the file (and kept in `bad`); if every one is damaged the
        run stops."""
        folders = self._folders()
        main = collectives.rank() == 0
        unfinished = [t for t, m in folders if m is None]
        if unfinished and main:
            log.warning("ignoring unfinished checkpoints (no COMPLETE marker, or REJECTED): %s", ", ".join(unfinished))
        skipped = []
        for tag, marker in reversed([(t, m) for t, m in folders if m is not None and t not in self.bad]):
            path = self.root / tag
            problems = find_problems(path, marker)
            if problems:
                self.bad[tag] = problems[0]
                skipped.append(f"{tag}: {problems[0]}")
                if main:
                    log.warning("skipping checkpoint %s: %s", path, "; ".join(problems))
                continue
            if "files" not in marker and main:
                log.warning("checkpoint %s has no manifest (written by an older version): its files are not "
                            "verified", path)
            return path
        if skipped or self.bad:
            raise CheckpointError(f"no usable checkpoint in {self.root}: every complete one is damaged "
                                  f"({'; '.join(f'{t}: {why}' for t, why in self.bad.items())}). Repair or move "
                                  "them away (a run without checkpoints starts afresh).")
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
        if collectives.rank() == 0 and (path / "COMPLETE").is_file():
            (path / REJECTED).write_text(reason + "\n")
            log.warning("marked %s as %s: %s", path, REJECTED, reason)
        return self.last_good(excluding=tag)

    # ------------------------------------------------------------------ writing

    def save(self, step: int, parts, client_state: dict) -> Path:
        """Collective: every rank calls it. Returns the checkpoint folder. Asynchronous: the state is serialized
        into memory here and written by a thread; the checkpoint is completed by the next save or finish().
        A failed write (a full disk) raises CheckpointError on every rank, with the partial folder removed."""
        self.finish()                                 # at most one save in flight
        path = self.root / tag_for(step)
        if not weights_finite(parts):
            raise FloatingPointError(f"the weights after step {step} are not finite: checkpoint {path} not written. "
                                     f"Last good checkpoint: {self.last_good() or 'none'}.")
        rank, engine = collectives.rank(), parts.engine
        if rank == 0 and path.exists():              # a leftover of an interrupted or rejected save of this step
            shutil.rmtree(path)
        collectives.barrier()
        writer = BackgroundWriter() if self.asynchronous else None
        engine.checkpoint_engine.begin_save(writer)
        try:                                          # DeepSpeed's files; its write errors are kept, not raised
            engine.save_checkpoint(str(self.root), tag=path.name, save_latest=False)
        finally:
            error = engine.checkpoint_engine.end_save()
        if error is None:
            try:
                save_file(rng_state(), path / f"rank{rank}.pt", writer)
                if parts.teacher.partitioned:        # each rank its own shard: no rank ever holds the whole teacher
                    save_file(parts.teacher.local_state(), path / f"teacher_rank{rank}.pt", writer)
                elif rank == 0:
                    save_file(parts.teacher.full_state_dict(), path / "teacher.pt", writer)
                if rank == 0:
                    save_file(client_state, path / "client_state.pt", writer)
            except OSError as e:
                error = str(e)
        if writer is not None:
            error = collectives.first_error(error)    # every rank starts its writer, or none does
            if error is None:
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
        error = collectives.first_error(error)        # every rank has finished writing: safe to clean up
        if error:
            self._failed(path, error)
        files = describe_files(path)
        if collectives.rank() == 0:
            try:
                write_marker(path, step, self.layout, files)
            except OSError as e:
                error = str(e)
        error = collectives.broadcast_object(error)
        if error:
            self._failed(path, error)
        collectives.barrier()
        self._prune(newest=path.name)
        collectives.barrier()

    def _failed(self, path: Path, error: str):
        """Collective (every rank agreed on `error`): remove the partial folder, raise on every rank."""
        if collectives.rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        collectives.barrier()
        raise CheckpointError(f"saving checkpoint {path} failed: {error}. Its partial folder was removed; "
                              f"the previous checkpoint {self.last_good() or '(none)'} is untouched.")

    def _prune(self, newest: str) -> None:
        """Collective. Keep the newest `keep` checkpoints and, whatever `keep` says, the newest one before `newest`:
        only the loss of the step after a checkpoint shows its weights are sound, and `newest` has not had that yet."""
        good = [t for t, m in self._folders() if m is not None and t not in self.bad and t <= newest]
        protected = set(good[-self.keep:]) | {t for t in good[-2:-1]}
        for tag in good:
            if tag not in protected and collectives.rank() == 0:
                shutil.rmtree(self.root / tag, ignore_errors=True)
                shutil.rmtree(self.root / (tag + "_universal"), ignore_errors=True)   # restore.universal_copy
