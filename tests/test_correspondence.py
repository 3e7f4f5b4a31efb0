"""The label-free correspondence monitor (losses/correspondence.py): the crop geometry mapped by hand-checkable
cases, and the region term's readings: 1.0 for features made to match, chance for shuffled ones."""
import numpy as np
import pytest
import torch
from PIL import Image

from esvit_scale.losses.correspondence import (corresponding_tokens, crop_to_image, image_to_crop,
                                               token_centres)


def geom(top, left, h, w, flip=0.0, angle=0.0):
    return torch.tensor([[top, left, h, w, flip, angle]], dtype=torch.float64)


def test_the_same_crop_maps_each_token_to_itself_and_a_round_trip_is_the_identity():
    g = geom(10, 20, 60, 80, flip=1.0, angle=17.0)
    expected, valid = corresponding_tokens(g, 96, 3, g, 96, 3)
    assert expected.tolist() == [list(range(9))] and valid.all()
    xy = torch.rand(1, 50, 2, dtype=torch.float64) * 96
    torch.testing.assert_close(image_to_crop(crop_to_image(xy, g, 96), g, 96), xy)


def test_hand_checked_maps_a_half_crop_a_mirror_and_a_quarter_turn():
    teacher = geom(0, 0, 60, 60)
    # the student crop is the teacher's left half (rows 0-29 of the image, columns 0-29 -> its top-left quarter)
    expected, valid = corresponding_tokens(geom(0, 0, 30, 30), 64, 2, teacher, 60, 2)
    assert expected.tolist() == [[0, 0, 0, 0]] and valid.all()
    # mirrored: student column c sees teacher column 2 - c
    expected, _ = corresponding_tokens(geom(0, 0, 60, 60, flip=1.0), 96, 3, teacher, 96, 3)
    assert expected.tolist() == [[2, 1, 0, 5, 4, 3, 8, 7, 6]]
    # turned a quarter counter-clockwise (as PIL's rotate(90)): the student's top row is the teacher's right column
    expected, _ = corresponding_tokens(geom(0, 0, 60, 60, angle=90.0), 96, 3, teacher, 96, 3)
    assert expected.tolist() == [[2, 5, 8, 1, 4, 7, 0, 3, 6]]
    # a student crop beside the teacher's: no token corresponds
    _, valid = corresponding_tokens(geom(0, 100, 60, 60), 96, 3, teacher, 96, 3)
    assert not valid.any()


def test_pil_rotates_the_way_the_geometry_says():
    """A white dot right of centre, turned by PIL's rotate(90) (the loaders' turn), lands above the centre, where
    token_centres + the geometry put the student token that sees it."""
    img = np.zeros((96, 96), np.uint8)
    img[48, 80] = 255                                      # x = 80, y = 48: right of the centre (48, 48)
    turned = np.asarray(Image.fromarray(img).rotate(90, resample=Image.NEAREST))
    y, x = np.argwhere(turned == 255)[0]
    mapped = image_to_crop(torch.tensor([[[80.5, 48.5]]], dtype=torch.float64), geom(0, 0, 96, 96, angle=90.0), 96)
    assert abs(mapped[0, 0, 0] - (x + 0.5)) <= 1 and abs(mapped[0, 0, 1] - (y + 0.5)) <= 1
    assert token_centres(96, 3)[1].tolist() == [48.0, 16.0]


@pytest.fixture
def batch_geometry():
    """Geometry of 64 images' two global crops drawn by the reference augmentation (flips, 20 degree turns)."""
    from esvit_scale.config import DataConfig
    from esvit_scale.data.multicrop import crop_specs
    from esvit_scale.data.transforms import multi_crop
    data = DataConfig(global_crops_size=96, local_crops_size=[48], local_crops_number=[0], rotation_degrees=20)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (160, 200, 3), dtype=np.uint8))
    return torch.stack([multi_crop(img, crop_specs(data), seed)[1] for seed in range(64)])


def region_readings(geometry, shuffle: bool) -> dict:
    """RegionTerm on made-up outputs of the two global crops (3 x 3 tokens): each student token's feature is the
    teacher feature of the token of the other crop that covers its image point (or, shuffled, of another)."""
    from esvit_scale.config import LossConfig
    from esvit_scale.losses.esvit_loss import TeacherTargets
    from esvit_scale.losses.region import RegionTerm
    from esvit_scale.models.esvit import MultiCropOutput
    b, c, k = len(geometry), 32, 16
    gen = torch.Generator().manual_seed(1)
    teacher = [torch.nn.functional.normalize(torch.randn(b, 9, c, generator=gen), dim=-1) for _ in range(2)]
    student = []
    for v in range(2):
        expected, valid = corresponding_tokens(geometry[:, v], 96, 3, geometry[:, 1 - v], 96, 3)
        matched = teacher[1 - v].gather(1, expected.unsqueeze(-1).expand(-1, -1, c))
        feats = torch.where(valid.unsqueeze(-1), matched, torch.randn(b, 9, c, generator=gen))
        student.append(feats[:, torch.randperm(9, generator=gen)] if shuffle else feats)
    out_s = MultiCropOutput([torch.zeros(b, k)] * 2, [torch.randn(b, 9, k) for _ in range(2)], student)
    out_t = MultiCropOutput([torch.zeros(b, k)] * 2, None, teacher)
    targets = TeacherTargets(None, torch.softmax(torch.randn(2, b, 9, k), -1))
    _, readings = RegionTerm(LossConfig()).forward(out_s, out_t, targets, monitor=True, geometry=(geometry, [96, 96]))
    return {key: float(v) for key, v in readings.items() if "correspondence" in key}


def test_features_made_to_match_read_one_and_shuffled_ones_read_chance(batch_geometry):
    matched = region_readings(batch_geometry, shuffle=False)
    assert matched["region_correspondence"] == matched["region_correspondence_near"] == 1.0
    shuffled = region_readings(batch_geometry, shuffle=True)
    assert shuffled["region_correspondence_chance"] == pytest.approx(1 / 9)
    assert abs(shuffled["region_correspondence"] - 1 / 9) < 0.06, shuffled
