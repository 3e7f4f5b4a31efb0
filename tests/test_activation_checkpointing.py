import pytest
import torch

from esvit_scale.config import ConfigError, load_config
from esvit_scale.models.esvit import EsViT

OVER = ["model.arch=swin_nano", "model.window_size=4", "model.out_dim=32", "model.head_hidden_dim=16",
        "model.head_bottleneck_dim=8", "data.global_crops_size=32", "model.drop_path_rate=0.0"]


@pytest.mark.parametrize("setting, stages", [("true", [True] * 4),
                                            ("[false,true,true,false]", [False, True, True, False])])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(setting, stages):
    plain = EsViT(load_config(None, OVER))
    ckpt = EsViT(load_config(None, OVER + [f"model.activation_checkpointing={setting}"]))
    ckpt.load_state_dict(plain.state_dict())
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    losses = []
    for model in (plain, ckpt):
        model.train()
        out = model(crops)
        loss = sum(v.square().mean() for v in out.view_logits) + sum(r.square().mean() for r in out.region_logits)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert [s.grad_checkpointing for s in ckpt.backbone.swin.layers] == stages
    assert not any(s.grad_checkpointing for s in plain.backbone.swin.layers)


def test_per_stage_checkpointing_needs_one_bool_per_stage():
    with pytest.raises(ConfigError, match="model.activation_checkpointing: must be true, false or one bool per stage"):
        load_config(None, ["model.activation_checkpointing=[true,false]"])
