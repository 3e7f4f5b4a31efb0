"""The teacher's k-NN and linear probe as a running trainer takes them: at initialisation, every
`eval.knn_every_epochs`, at the end. A stop request (preemption) ends them between batches on every rank at once:
`Preempted` (the trainer has saved already)."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from esvit_scale.engine import collectives
from esvit_scale.step import teacher_autocast

log = logging.getLogger("esvit_scale")


STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Preempted(Exception):
    """A stop request read during an evaluation: the state is saved already; the run ends as preempted."""


class TeacherProbe:
    def __init__(self, cfg, teacher, train_path: str, val_path: Optional[str], device: torch.device,
                 input_dtype: torch.dtype, interrupted: Callable[[], bool]):
        """interrupted(): whether a stop request should end an evaluation now (checked on every rank per batch)."""
        self.cfg, self.teacher, self.train_path, self.val_path = cfg.eval, teacher, train_path, val_path
        self.device, self.input_dtype, self.interrupted = device, input_dtype, interrupted

    def knn(self) -> Optional[dict]:
        """k-NN top-1 (%) of the teacher backbone per k (keys as strings), or None without a validation folder."""
        if not self.val_path:
            log.warning("k-NN skipped: eval.val_path is not set")
            return None
        from esvit_scale.eval.knn import knn_eval
        e = self.cfg
        with teacher_autocast(self.device, self.input_dtype):
            result = knn_eval(self._view_features, self.train_path, self.val_path, e.knn_k, e.knn_temperature,
                              e.resize_size, e.image_size, self.device, storage_dtype=STORAGE[e.knn_dtype])
        return {str(k): v for k, v in result.items()}

    def linear(self) -> Optional[float]:
        """Linear-probe top-1 (%) of the teacher backbone, or None without a validation folder."""
        if not self.val_path:
            log.warning("linear probe skipped: eval.val_path is not set")
            return None
        from esvit_scale.eval.linear import block_features_fn, linear_eval
        e = self.cfg
        blocks = block_features_fn(self.teacher.module.backbone, e.linear_blocks)
        with teacher_autocast(self.device, self.input_dtype):
            return linear_eval(lambda x: self._checked(blocks, x), self.train_path, self.val_path, e.resize_size,
                               e.image_size, self.device, epochs=e.linear_epochs)

    @torch.no_grad()
    def _view_features(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's view feature. At ZeRO-3 the engine's hooks gather each layer as it runs."""
        return self._checked(lambda x: self.teacher.module.backbone(x)[0], x)

    def _checked(self, forward, x: torch.Tensor) -> torch.Tensor:
        if collectives.any_rank(self.interrupted()):
            raise Preempted
        return forward(x)
