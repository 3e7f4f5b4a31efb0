"""The reference multi-crop augmentation on PIL images (torchvision semantics), driven by an explicit RNG.

Every random draw comes from the `random.Random` passed in, seeded per sample and epoch, so a batch is the
same whatever the number of workers and after a resume.
"""
from __future__ import annotations

import math
import random

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from esvit_scale.data.multicrop import (CROP_RATIO, GRAYSCALE_PROB, IMAGENET_MEAN,
                                        IMAGENET_STD, JITTER, JITTER_PROB, SOLARIZE_THRESHOLD, CropSpec)


def random_resized_box(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height           # fallback: the central crop of the clamped aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_jitter(rng: random.Random) -> tuple[list[float], list[int]]:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) parameters: (brightness, contrast, saturation, hue) factors and the
    random order in which the four adjustments apply. Shared by the PIL and the DALI pipelines."""
    factors = [rng.uniform(1 - JITTER["brightness"], 1 + JITTER["brightness"]),
               rng.uniform(1 - JITTER["contrast"], 1 + JITTER["contrast"]),
               rng.uniform(1 - JITTER["saturation"], 1 + JITTER["saturation"]),
               rng.uniform(-JITTER["hue"], JITTER["hue"])]
    order = list(range(4))
    rng.shuffle(order)
    return factors, order


def color_jitter(img: Image.Image, rng: random.Random) -> Image.Image:
    """torchvision ColorJitter(0.4, 0.4, 0.2, 0.1): the four adjustments in a random order."""
    factors, order = draw_jitter(rng)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in order:
        img = ops[i](img, factors[i])
    return img


def augment_crop(img: Image.Image, spec: CropSpec, rng: random.Random) -> torch.Tensor:
    """One crop of the reference pipeline: (3, size, size) float32, normalised."""
    return _augment(img, spec, rng)[0]


def _augment(img: Image.Image, spec: CropSpec, rng: random.Random) -> tuple[torch.Tensor, tuple]:
    """The crop and its geometry: (top, left, height, width) of its box in the image, flip, angle."""
    top, left, h, w = random_resized_box(img.width, img.height, spec.scale, CROP_RATIO, rng)
    crop = TF.resized_crop(img, top, left, h, w, [spec.size, spec.size],
                           interpolation=TF.InterpolationMode.BICUBIC)
    flip = rng.random() < spec.flip_prob
    if flip:
        crop = TF.hflip(crop)
    angle = 0.0
    if spec.rotation > 0:                   # counter-clockwise for a positive angle; black corners
        angle = rng.uniform(-spec.rotation, spec.rotation)
        crop = crop.rotate(angle, resample=Image.BILINEAR)
    if rng.random() < JITTER_PROB:
        crop = color_jitter(crop, rng)
    if rng.random() < GRAYSCALE_PROB:
        crop = TF.rgb_to_grayscale(crop, num_output_channels=3)
    if rng.random() < spec.blur_prob:
        crop = crop.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*spec.blur_sigma)))
    if rng.random() < spec.solarize_prob:
        crop = ImageOps.solarize(crop, threshold=SOLARIZE_THRESHOLD)
    return TF.normalize(TF.to_tensor(crop), IMAGENET_MEAN, IMAGENET_STD), (top, left, h, w, float(flip), angle)


def multi_crop(img: Image.Image, specs: list[CropSpec], seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every crop of one image, and their geometry (n_crops, 6) (losses/correspondence.GEOMETRY)."""
    rng = random.Random(seed)
    crops, geometry = zip(*(_augment(img, spec, rng) for spec in specs))
    return list(crops), torch.tensor(geometry, dtype=torch.float32)


def eval_transform(img: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """The k-NN / linear-probe view: Resize(resize, bicubic) + CenterCrop(crop), normalised."""
    img = TF.resize(img, resize, interpolation=TF.InterpolationMode.BICUBIC)
    img = TF.center_crop(img, [crop, crop])
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)
