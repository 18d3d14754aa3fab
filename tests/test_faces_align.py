"""Exact geometry of FFHQ alignment, inverse warp and paste-back (no models needed)."""

import cv2
import numpy as np
import pytest

from ridfr_core.faces import FaceInputError
from ridfr_core.faces.align import (FFHQ_TEMPLATE_512, estimate_alignment, feather_mask, inverse_alignment,
                                    paste_face, upscale_image, warp_to_crop)


def similarity(points, angle_deg, scale, shift):
    angle = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return points @ (scale * rotation).T + np.asarray(shift)


def smooth_photo(height=600, width=800, seed=0):
    noise = np.random.default_rng(seed).uniform(0, 255, (height // 8, width // 8, 3)).astype(np.float32)
    return np.clip(cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


KPS = similarity(FFHQ_TEMPLATE_512.astype(np.float64) - 256, 17.0, 0.45, (410, 290))


def marker_centroid(image):
    weights = image[..., 0].astype(np.float64)
    ys, xs = np.mgrid[:image.shape[0], :image.shape[1]]
    return np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()


def test_alignment_maps_landmarks_onto_template_and_back():
    matrix = estimate_alignment(KPS)
    mapped = KPS @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, FFHQ_TEMPLATE_512, atol=1e-3)
    inverse = inverse_alignment(matrix)
    np.testing.assert_allclose(FFHQ_TEMPLATE_512 @ inverse[:, :2].T + inverse[:, 2], KPS, atol=1e-3)


@pytest.mark.parametrize("upscale", [1.0, 2.0, 3.0])
def test_align_then_inverse_warp_round_trips_a_marker_within_a_pixel(upscale):
    photo = np.zeros((600, 800, 3), np.uint8)
    marker = np.array([430.0, 300.0])
    cv2.circle(photo, (430, 300), 4, (255, 255, 255), -1)
    matrix = estimate_alignment(KPS)
    crop = warp_to_crop(photo, matrix)
    crop[crop.sum(axis=2) == 135 + 133 + 132] = 0  # border fill is not part of the marker
    back = cv2.warpAffine(crop, inverse_alignment(matrix, upscale),
                          (int(800 * upscale), int(600 * upscale)))
    expected = marker * upscale + (upscale - 1) / 2
    assert np.abs(marker_centroid(back) - expected).max() < 1.0


def test_round_trip_reproduces_the_face_region():
    photo = smooth_photo()
    matrix = estimate_alignment(KPS)
    canvas = photo.copy()
    mask = paste_face(canvas, warp_to_crop(photo, matrix), matrix)
    inside = mask > 0.99
    assert inside.sum() > 10000
    assert np.abs(canvas[inside].astype(int) - photo[inside]).mean() < 2.0


@pytest.mark.parametrize("upscale", [1.0, 2.0])
def test_paste_leaves_pixels_outside_the_mask_untouched(upscale):
    photo = np.random.default_rng(1).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    restored = np.random.default_rng(2).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    matrix = estimate_alignment(KPS)
    base = upscale_image(photo, upscale)
    canvas = base.copy()
    mask = paste_face(canvas, restored, matrix, upscale)
    assert mask.shape == base.shape[:2]
    outside = mask == 0
    assert outside.any() and (mask == 1).any()
    np.testing.assert_array_equal(canvas[outside], base[outside])
    assert (canvas[mask == 1] != base[mask == 1]).any()


def test_paste_of_a_face_partly_outside_the_photo():
    photo = np.full((300, 300, 3), 50, np.uint8)
    kps = similarity(FFHQ_TEMPLATE_512.astype(np.float64) - 256, 0.0, 0.6, (10, 280))
    matrix = estimate_alignment(kps)
    mask = paste_face(photo, np.full((512, 512, 3), 200, np.uint8), matrix)
    assert mask.max() == 1.0 and mask[:, 200:].max() == 0
    np.testing.assert_array_equal(photo[mask == 0], 50)


def test_feather_mask_is_zero_at_the_edge_and_one_inside():
    mask = feather_mask(512)
    assert mask[0].max() == 0 and mask[:, -1].max() == 0 and mask[9].max() == 0
    assert mask[256, 256] == 1.0 and mask[100:412, 100:412].min() == 1.0
    assert np.all(np.diff(mask[256, :256]) >= 0)


def test_degenerate_landmarks_are_refused():
    with pytest.raises(FaceInputError, match="5 finite"):
        estimate_alignment(np.zeros((4, 2)))
    with pytest.raises(FaceInputError, match="degenerate"):
        estimate_alignment(np.zeros((5, 2)))


def test_upscale_modes():
    photo = smooth_photo(60, 80)
    assert upscale_image(photo, 2.0, "lanczos").shape == (120, 160, 3)
    with pytest.raises(FaceInputError, match="upscale_mode"):
        upscale_image(photo, 2.0, "magic")
    with pytest.raises(FaceInputError, match="upscale_mode"):  # a typo is reported even when nothing is resized
        upscale_image(photo, 1.0, "magic")
    with pytest.raises(FaceInputError, match="upscale: must be positive"):
        upscale_image(photo, 0.0)


def test_paste_writes_the_mask_into_a_given_array():
    photo = smooth_photo()
    matrix = estimate_alignment(KPS)
    expected = paste_face(photo.copy(), warp_to_crop(photo, matrix), matrix)
    masks = np.zeros((2,) + photo.shape[:2], np.float32)
    returned = paste_face(photo.copy(), warp_to_crop(photo, matrix), matrix, out=masks[1])
    np.testing.assert_array_equal(masks[1], expected)
    assert np.shares_memory(returned, masks[1]) and masks[0].max() == 0
