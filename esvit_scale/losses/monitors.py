"""Training health: readings of the teacher's distributions and the features that tell a learning run from a
collapsing one, and a watch that names a collapse when its signature persists.

Readings (nats; K prototypes, so ln K is the entropy of a uniform distribution):
- `<head>_teacher_entropy`: mean entropy of the teacher's rows. ~ln K: every row near uniform.
- `<head>_teacher_batch_entropy`: entropy of the batch-mean teacher distribution. Near 0: every row picks the
  same prototype(s). Together: uniform collapse (both ~ln K), one-prototype collapse (both ~0), healthy (rows
  sharp, batch mean spread).
- `view_agreement`: fraction of (teacher view, student crop) pairs whose argmax prototypes agree.
- `feature_std`: std across the batch of the teacher's L2-normalised backbone view features, mean over channels.
  Random directions read ~1/sqrt(C); 0 is a network that maps every image to one point.
- `<head>_center_norm`: the norm of the centre subtracted from the teacher's logits.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PERSIST = 3              # readings in a row that show a signature before the warning
REPEAT_EVERY = 20        # while it persists, the warning comes again every this many readings


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of probabilities (..., K)."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)


def distribution_readings(probs: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """probs (N, K) teacher rows -> mean row entropy and the entropy of the mean row."""
    probs = probs.float()
    return {f"{prefix}_teacher_entropy": entropy(probs).mean(),
            f"{prefix}_teacher_batch_entropy": entropy(probs.mean(dim=0))}


def agreement(teacher_probs: list[torch.Tensor], student_logits: list[torch.Tensor]) -> torch.Tensor:
    """Fraction of (teacher crop g, student crop v != g, image) triples with the same argmax prototype."""
    hits, count = 0.0, 0
    for g, t in enumerate(teacher_probs):
        t_arg = t.argmax(dim=-1)
        for v, s in enumerate(student_logits):
            if v != g:
                hits = hits + (s.argmax(dim=-1) == t_arg).float().sum()
                count += t_arg.numel()
    return torch.as_tensor(hits, dtype=torch.float32) / max(count, 1)


def feature_spread(features: torch.Tensor) -> torch.Tensor:
    """features (B, C) -> mean over channels of the std across the batch of the L2-normalised rows."""
    return F.normalize(features.float(), dim=-1).std(dim=0).mean()


SIGNATURES = {
    "uniform": "the teacher's {head} outputs are near uniform (row entropy {row:.2f} of ln K = {lnk:.2f}): the "
               "centre cancels everything the head says. What usually helps: when the images share most of their "
               "content, a batch-normalised head (model.head_batchnorm=true); a lower learning rate or a longer "
               "warm-up; a larger EMA momentum (docs/training.md)",
    "one_prototype": "the teacher puts every image on the same prototype(s) (entropy of the batch-mean {head} "
                     "distribution {batch:.2f} nats): centring is too weak for the sharpening. What usually "
                     "helps: a faster centre (lower loss.center_momentum) or a higher teacher temperature",
    "features": "the backbone maps every image to nearly one point (feature std {std:.4f} against ~{rand:.4f} "
                "for spread features). What usually helps: a lower learning rate, more weight decay warm-up",
}


class CollapseWatch:
    """Reads the monitors at each log step; warns once a collapse signature persists, then at intervals."""

    def __init__(self, out_dim: int, feature_dim: int):
        self.ln_k, self.feature_dim = math.log(out_dim), feature_dim
        self.streaks: dict[str, int] = {}
        self.active: set[str] = set()

    def signatures(self, readings: dict[str, float]) -> dict[str, str]:
        """The signatures these readings show, each with its message."""
        found = {}
        for head in ("view", "region"):
            row = readings.get(f"{head}_teacher_entropy")
            batch = readings.get(f"{head}_teacher_batch_entropy")
            if row is None or batch is None:
                continue
            if row > 0.95 * self.ln_k:
                found[f"uniform/{head}"] = SIGNATURES["uniform"].format(head=head, row=row, lnk=self.ln_k)
            elif batch < math.log(2):
                found[f"one_prototype/{head}"] = SIGNATURES["one_prototype"].format(head=head, batch=batch)
        std = readings.get("feature_std")
        if std is not None and std < 0.05 / math.sqrt(self.feature_dim):
            found["features"] = SIGNATURES["features"].format(std=std, rand=1 / math.sqrt(self.feature_dim))
        return found

    def update(self, readings: dict[str, float], step: int) -> list[str]:
        """The warnings to give at this step (also logged)."""
        found = self.signatures(readings)
        warnings = []
        for name in list(self.streaks):
            if name not in found:
                del self.streaks[name]
                if name in self.active:
                    self.active.discard(name)
                    log.info("collapse signature '%s' is gone at step %d", name, step)
        for name, message in found.items():
            n = self.streaks[name] = self.streaks.get(name, 0) + 1
            if n == PERSIST or (n > PERSIST and (n - PERSIST) % REPEAT_EVERY == 0):
                self.active.add(name)
                warnings.append(f"collapse ({name}) for {n} readings in a row at step {step}: {message}")
        for w in warnings:
            log.warning(w)
        return warnings

    def last(self) -> Optional[list[str]]:
        return sorted(self.active) or None
