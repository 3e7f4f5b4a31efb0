"""The torch/PIL reference loader on real JPEG folders."""
import numpy as np
import pytest
import torch
from PIL import Image

from esvit_scale.config import load_config
from esvit_scale.data.folder import index_folder
from esvit_scale.data.multicrop import crop_specs
from esvit_scale.data.sampler import ShardedOrder
from esvit_scale.data.torch_loader import TorchMultiCropLoader


def data_cfg(**kw):
    over = {"data.batch_size_per_gpu": 4, "data.num_workers": 0, "data.global_crops_size": 32,
            "data.local_crops_size": "[16,8]", "data.local_crops_number": "[2,1]", **kw}
    return load_config(None, [f"{k}={v}" for k, v in over.items()]).data


def test_crop_shapes_dtypes_order(image_folder):
    loader = TorchMultiCropLoader(index_folder(image_folder), data_cfg(), seed=0)
    crops = next(loader.epoch(0))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)]
    assert all(c.dtype == torch.float32 and c.abs().max() < 3.0 and c.std() > 0.1 for c in crops)
    specs = crop_specs(data_cfg())
    assert [s.solarize_prob for s in specs] == [0, 0.2, 0, 0, 0] and specs[0].blur_prob == 1.0


def test_augmentation_keys_reach_both_pipelines_draws():
    """data.hflip_prob / solarize_prob / blur_sigma shape the crops of the PIL pipeline and the DALI parameter rows
    alike, and leave the sequence of random draws as it was (a resume stays exact)."""
    import random

    from esvit_scale.data import dali_params
    specs = crop_specs(data_cfg(**{"data.hflip_prob": 0.0, "data.solarize_prob": 0.0, "data.blur_sigma": "[0.5,0.6]"}))
    assert all(s.flip_prob == 0 and s.solarize_prob == 0 and s.blur_sigma == (0.5, 0.6) for s in specs)
    plain = crop_specs(data_cfg())
    rows = [dali_params.draw_crop(64, 64, spec, random.Random(i)) for i in range(200) for spec in specs]
    roi = np.array([r[dali_params.ROI] for r in rows])
    assert (roi[:, 1] < roi[:, 3]).all()                                  # x0 < x1: never flipped
    assert not any(r[dali_params.SOLARIZE] for r in rows)
    sigmas = [r[dali_params.SIGMA] for r in rows if r[dali_params.BLUR]]
    assert sigmas and all(0.5 <= s <= 0.6 for s in sigmas)
    default_roi = np.array([dali_params.draw_crop(64, 64, spec, random.Random(i))[dali_params.ROI]
                            for i in range(200) for spec in plain])
    assert (default_roi[:, 1] > default_roi[:, 3]).any()                  # the default flips some
    same_rng, other = random.Random(7), random.Random(7)                  # as many draws whatever the settings
    dali_params.draw_crop(64, 64, specs[1], same_rng), dali_params.draw_crop(64, 64, plain[1], other)
    assert same_rng.random() == other.random()



def test_rotation_key_draws_angles_only_when_on():
    """data.rotation_degrees: every crop gets an angle in [-d, d] (the DALI row's ANGLE column); off (0), no angle is
    drawn, so the default configs draw exactly as before the key existed; out of range, the key is named."""
    import random

    from esvit_scale.config import ConfigError
    from esvit_scale.data import dali_params
    turned, plain = crop_specs(data_cfg(**{"data.rotation_degrees": 12})), crop_specs(data_cfg())
    angles = [dali_params.draw_crop(64, 64, spec, random.Random(i))[dali_params.ANGLE]
              for i in range(100) for spec in turned]
    assert all(abs(a) <= 12 for a in angles) and max(angles) > 6 and min(angles) < -6
    rng = random.Random(3)
    assert not any(dali_params.draw_crop(64, 64, spec, rng)[dali_params.ANGLE] for spec in plain)
    a, b = random.Random(5), random.Random(5)
    dali_params.draw_crop(64, 64, turned[0], a), dali_params.draw_crop(64, 64, plain[0], b)
    assert a.random() != b.random()                                   # one more draw per crop when on
    with pytest.raises(ConfigError, match="data.rotation_degrees"):
        data_cfg(**{"data.rotation_degrees": -5})

def test_rotation_turns_the_crop():
    """A positive angle turns counter-clockwise on screen in the PIL reference (and so in DALI, which
    test_dali_loader checks against it): a bright bar on the right of a square ends up on top after +90 degrees."""
    import random

    from esvit_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, CropSpec
    from esvit_scale.data.transforms import augment_crop
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 48:] = 255
    spec = CropSpec(64, (1.0, 1.0), blur_prob=0.0, solarize_prob=0.0, flip_prob=0.0, rotation=90.0)

    class Fixed(random.Random):            # every uniform draw at its upper end, every coin "no"
        def uniform(self, a, b):
            return b

        def random(self):
            return 0.999

    crop = augment_crop(Image.fromarray(img), spec, Fixed(0))
    out = ((crop * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255).mean(0)
    assert out[:12].mean() > 200 and out[-12:].mean() < 30 and out[:, -12:].mean() < 130


def test_sharding_disjoint_complete_and_drop_last():
    order = [ShardedOrder(50, batch_size=4, rank=r, world_size=2, seed=3) for r in range(2)]
    a, b = order[0].indices(5), order[1].indices(5)
    assert len(a) == len(b) == 24 and not set(a) & set(b) and len(set(a) | set(b)) == 48
    assert not np.array_equal(order[0].indices(5), order[0].indices(6))          # reshuffled per epoch
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedOrder(7, batch_size=4, world_size=2)


def test_mid_epoch_resume_is_exact_whatever_the_workers(image_folder):
    index = index_folder(image_folder)
    full = list(TorchMultiCropLoader(index, data_cfg(), seed=1).epoch(2))
    resumed = list(TorchMultiCropLoader(index, data_cfg(**{"data.num_workers": 2}), seed=1).epoch(2, start_batch=3))
    assert len(resumed) == len(full) - 3
    for x, y in zip(full[3:], resumed):
        assert all(torch.equal(a, b) for a, b in zip(x, y))


def test_bad_images_are_skipped_not_fatal(tmp_path, caplog):
    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"ok{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(folder / "tiny.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = (folder / "ok0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("not an image")
    index = index_folder(tmp_path / "imgs")
    assert any(p.endswith("notes.txt") for p in index.skipped) and len(index) == 12
    loader = TorchMultiCropLoader(index, data_cfg(**{"data.batch_size_per_gpu": 12}), seed=0)
    with caplog.at_level("WARNING"):
        crops = next(loader.epoch(0))
    assert crops[0].shape == (12, 3, 32, 32) and torch.isfinite(crops[0]).all()
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "corrupt.jpg" in skipped and "truncated.jpg" in skipped and "ok0.jpg" not in skipped


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        index_folder(tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        index_folder(tmp_path / "empty")
