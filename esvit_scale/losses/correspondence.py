"""A label-free reading of the region features: do they learn correspondence?

The loaders know every crop's geometry (its box in the image, its flip, its rotation: GEOMETRY), so for each
student region token the teacher token that covers the same image point is known. The region term matches each
student token to a teacher token by feature similarity (its argmax); the fraction of student tokens whose match is
the corresponding token (`region_correspondence`), or it or one of its 8 neighbours (`region_correspondence_near`),
is chance (1 / L_t, resp. up to 9 / L_t) for features that know nothing, and rises as they learn to recognise the
same place in two views. Only tokens whose point falls inside the teacher crop count.

Token (r, c) of the G x G last-stage tokens of a crop of S pixels stands for the square of side S / G at
((c + 0.5) S / G, (r + 0.5) S / G).
"""
from __future__ import annotations

import math

import torch

GEOMETRY = ("top", "left", "height", "width", "flip", "angle")     # per crop, in image pixels and degrees


def grid(tokens: int) -> int:
    """G of a square G x G token map."""
    g = math.isqrt(tokens)
    if g * g != tokens:
        raise ValueError(f"{tokens} region tokens are not a square map")
    return g


def token_centres(size: int, g: int) -> torch.Tensor:
    """(G * G, 2) x, y of the tokens' squares' centres in crop pixels, row-major as the region tokens are."""
    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    return torch.stack([(c.flatten() + 0.5) * size / g, (r.flatten() + 0.5) * size / g], dim=1).double()


def _rotation(angle_deg: torch.Tensor) -> torch.Tensor:
    """(B, 2, 2): a counter-clockwise turn as seen on the screen, in (x right, y down) pixel coordinates."""
    a = torch.deg2rad(angle_deg)
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)


def crop_to_image(xy: torch.Tensor, geom: torch.Tensor, size: int) -> torch.Tensor:
    """(B, N, 2) crop pixels -> image pixels: undo the rotation (about the crop's centre), the flip, the resize."""
    centre = size / 2
    xy = torch.einsum("bji,bnj->bni", _rotation(geom[:, 5]), xy - centre) + centre      # R^T: the inverse turn
    x = torch.where(geom[:, 4:5] > 0.5, size - xy[..., 0], xy[..., 0])
    return torch.stack([geom[:, 1:2] + x * geom[:, 3:4] / size, geom[:, 0:1] + xy[..., 1] * geom[:, 2:3] / size], -1)


def image_to_crop(xy: torch.Tensor, geom: torch.Tensor, size: int) -> torch.Tensor:
    """(B, N, 2) image pixels -> crop pixels: resize into the box, flip, turn (crop_to_image's inverse)."""
    x = (xy[..., 0] - geom[:, 1:2]) * size / geom[:, 3:4]
    y = (xy[..., 1] - geom[:, 0:1]) * size / geom[:, 2:3]
    x = torch.where(geom[:, 4:5] > 0.5, size - x, x)
    centre = size / 2
    return torch.einsum("bij,bnj->bni", _rotation(geom[:, 5]), torch.stack([x, y], -1) - centre) + centre


def corresponding_tokens(geom_s: torch.Tensor, size_s: int, g_s: int, geom_t: torch.Tensor, size_t: int, g_t: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every student token (B, G_s^2): the teacher token covering the same image point, and whether there is
    one (the point lies inside the teacher crop)."""
    centres = token_centres(size_s, g_s).expand(len(geom_s), -1, -1)
    xy = image_to_crop(crop_to_image(centres, geom_s.double(), size_s), geom_t.double(), size_t)
    cell = size_t / g_t
    col, row = (xy[..., 0] / cell).floor().long(), (xy[..., 1] / cell).floor().long()
    inside = (xy[..., 0] >= 0) & (xy[..., 0] < size_t) & (xy[..., 1] >= 0) & (xy[..., 1] < size_t)
    return (row.clamp(0, g_t - 1) * g_t + col.clamp(0, g_t - 1)), inside


def correspondence(match: torch.Tensor, expected: torch.Tensor, valid: torch.Tensor, grid_t: int
                   ) -> tuple[float, float, int]:
    """(exact hits, hits within one cell, tokens counted) of feature matches against the geometric ones."""
    m, e = match[valid].long(), expected[valid]
    near = ((m // grid_t - e // grid_t).abs() <= 1) & ((m % grid_t - e % grid_t).abs() <= 1)
    return float((m == e).sum()), float(near.sum()), int(valid.sum())


def readings(matches: dict, geometry: torch.Tensor, sizes: list[int], tokens: list[int], student: int
             ) -> tuple[float, float, float, int]:
    """Hits, near hits, chance hits (sum of 1 / L_t) and tokens counted, of student crop `student`'s matches
    {teacher crop g: (B, L_s) teacher token} against the geometry (B, n_crops, 6) of the batch."""
    hits = near = chance = count = 0.0
    geometry = geometry.cpu()
    for g, match in matches.items():
        expected, valid = corresponding_tokens(geometry[:, student], sizes[student], grid(tokens[student]),
                                               geometry[:, g], sizes[g], grid(tokens[g]))
        h, n, c = correspondence(match.cpu(), expected, valid, grid(tokens[g]))
        hits, near, count = hits + h, near + n, count + c
        chance += c / tokens[g]
    return hits, near, chance, int(count)
