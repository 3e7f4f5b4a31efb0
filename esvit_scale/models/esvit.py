"""EsViT network: backbone (models/registry.py) + view head + region head, run over a multi-crop batch.

The student sees every crop, the teacher the two global crops. Crops of one resolution are batched
into one backbone pass, so any number of local-crop sizes works.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

import torch
from torch import nn

from esvit_scale.config import Config
from esvit_scale.models.heads import ProjectionHead
from esvit_scale.models.registry import build_backbone
from esvit_scale.ops.region_matching import consumable_chunks


@dataclass
class MultiCropOutput:
    """One entry per crop, in crop order. B images per crop, L_v tokens of crop v, K prototypes, C channels."""
    view_logits: list[torch.Tensor]             # (B, K)
    region_logits: list[torch.Tensor] | None    # (B, L_v, K), None without the region head
    region_features: list[torch.Tensor]         # (B, L_v, C) backbone tokens, for the region matching


class EsViT(nn.Module):
    def __init__(self, cfg: Config, is_teacher: bool = False):
        super().__init__()
        m = cfg.model
        on_gpu = torch.cuda.is_available() and cfg.run.device != "cpu"     # where the engine will put the model
        self.backbone = build_backbone(m, img_size=cfg.data.global_crops_size,
                                       drop_path_rate=0.0 if is_teacher else None, kernels=cfg.kernels, on_gpu=on_gpu)
        head = dict(in_dim=self.backbone.num_features, out_dim=m.out_dim, hidden_dim=m.head_hidden_dim,
                    bottleneck_dim=m.head_bottleneck_dim, norm_last_layer=m.norm_last_layer,
                    batchnorm=m.head_batchnorm)
        self.view_head = ProjectionHead(**head)
        region_bn = m.head_batchnorm if m.region_head_batchnorm is None else m.region_head_batchnorm
        self.region_head = ProjectionHead(**{**head, "batchnorm": region_bn}) if cfg.loss.region_loss else None

    def forward(self, crops: list[torch.Tensor]) -> MultiCropOutput:
        view_logits, region_logits, region_features = [], [], []
        # consecutive crops of one size -> one backbone pass over their concatenation
        for _, group in groupby(crops, key=lambda c: tuple(c.shape[-2:])):
            group = list(group)
            view, region = self.backbone(torch.cat(group))          # (nB, C), (nB, L, C)
            n = len(group)
            view_logits += self.view_head(view).chunk(n)
            region_features += region.chunk(n)
            if self.region_head is not None:   # the fused region loss writes their gradient over them
                region_logits += consumable_chunks(self.region_head(region), n)
        return MultiCropOutput(view_logits, region_logits if self.region_head is not None else None,
                               region_features)

    def decays(self, name: str, dims: int) -> bool:
        """Whether parameter `name` gets weight decay: the backbone's rule for its own, else (the heads) weights of
        two or more dimensions except the last layers' norms."""
        if name.startswith("backbone."):
            return self.backbone.decays(name[len("backbone."):], dims)
        return dims > 1 and not name.endswith(".bias") and not name.endswith("weight_g")

    def compile_parts(self) -> None:
        """torch.compile the backbone and the heads in place (nn.Module.compile): parameter and state_dict names do not
        change, and the crop grouping and the heads' chunking stay eager around them."""
        for part in (self.backbone, self.view_head, self.region_head):
            if part is not None:
                part.compile()


def last_layer_parameter_names(model: nn.Module) -> set[str]:
    """The heads' last layers, frozen during the first `optim.freeze_last_layer` epochs."""
    return {name for name, _ in model.named_parameters() if ".last_layer." in name}
