"""ridfr_core.data.degrade: Eq. 7 stages each do what they should, deterministically, with checked configs."""

import cv2
import numpy as np
import pytest

from ridfr_core.data.degrade import (
    DegradationConfig,
    DegradationParams,
    apply_degradation,
    degrade,
    downsample_reference,
    gaussian_kernel,
    jpeg_roundtrip,
)

NO_DEGRADATION = DegradationParams(
    blur_sigma_x=None, blur_sigma_y=None, blur_rotation_deg=0.0, blur_kernel_size=41, downsample_scale=1.0,
    downsample_interpolation="area", noise_sigma=0.0, noise_seed=0, jpeg_quality=None,
)


def with_stage(**changes) -> DegradationParams:
    return DegradationParams(**{**NO_DEGRADATION.to_dict(), **changes})


@pytest.fixture(scope="module")
def textured_image():
    """Photo-like: smooth shapes plus fine texture, so every stage has something to remove."""
    rng = np.random.default_rng(123)
    image = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), (0, 0), 1.0)
    cv2.circle(image, (128, 128), 70, (200, 120, 90), -1)
    return image


def high_frequency_energy(image):
    gray = image.astype(np.float64).mean(axis=2)
    return float(np.mean(cv2.Laplacian(gray, cv2.CV_64F) ** 2))


def test_same_seed_same_output_and_params(textured_image):
    first, first_params = degrade(textured_image, np.random.default_rng(7), return_params=True)
    second, second_params = degrade(textured_image, np.random.default_rng(7), return_params=True)
    assert np.array_equal(first, second)
    assert first_params == second_params
    assert np.array_equal(apply_degradation(textured_image, first_params), first)  # params replay exactly


def test_different_seeds_differ(textured_image):
    assert not np.array_equal(degrade(textured_image, np.random.default_rng(1)), degrade(textured_image, np.random.default_rng(2)))


def test_output_keeps_shape_and_dtype():
    image = np.full((96, 80, 3), 128, np.uint8)
    for seed in range(5):
        out = degrade(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8


def test_stages_off_is_identity(textured_image):
    assert np.array_equal(apply_degradation(textured_image, NO_DEGRADATION), textured_image)


def test_blur_reduces_high_frequency_energy(textured_image):
    for sigma_y, rotation in ((3.0, 0.0), (6.0, 30.0)):  # isotropic, then anisotropic
        blurred = apply_degradation(textured_image, with_stage(blur_sigma_x=3.0, blur_sigma_y=sigma_y, blur_rotation_deg=rotation))
        assert high_frequency_energy(blurred) < 0.1 * high_frequency_energy(textured_image)


def test_anisotropic_kernel_is_normalised_and_oriented():
    kernel = gaussian_kernel(41, 1.0, 6.0, 0.0)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
    assert kernel[:, 20].sum() > 3 * kernel[20, :].sum()  # long axis is vertical (sigma_y)
    rotated = gaussian_kernel(41, 1.0, 6.0, 90.0)
    assert np.allclose(rotated, kernel.T, atol=1e-6)


def test_noise_adds_expected_variance_to_flat_image():
    flat = np.full((256, 256, 3), 128, np.uint8)
    noisy = apply_degradation(flat, with_stage(noise_sigma=10.0, noise_seed=3))
    # rounding to uint8 adds 1/12 of variance
    assert noisy.astype(np.float64).var() == pytest.approx(10.0**2 + 1 / 12, rel=0.05)


def test_low_jpeg_quality_loses_more(textured_image):
    def error(quality):
        out = apply_degradation(textured_image, with_stage(jpeg_quality=quality))
        return np.abs(out.astype(np.float64) - textured_image).mean()

    assert error(100) < error(50) < error(10)


def test_downsample_by_four_loses_detail(textured_image):
    out = apply_degradation(textured_image, with_stage(downsample_scale=4.0))
    assert out.shape == textured_image.shape
    assert high_frequency_energy(out) < 0.2 * high_frequency_energy(textured_image)
    # the smooth shape survives: coarse content is kept while detail is lost
    coarse = lambda image: cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float64)
    assert np.abs(coarse(out) - coarse(textured_image)).mean() < 3.0



def test_stages_run_in_eq7_order(textured_image):
    """[(I * k) down_r + n]_JPEG, then back to the input size: the same stages composed by hand in
    Eq. 7's order give the same image, and swapping noise and downsampling does not."""
    params = with_stage(blur_sigma_x=2.0, blur_sigma_y=4.0, blur_rotation_deg=25.0, downsample_scale=4.0,
                        downsample_interpolation="linear", noise_sigma=8.0, noise_seed=11, jpeg_quality=40)
    kernel = gaussian_kernel(41, 2.0, 4.0, 25.0)
    blurred = cv2.filter2D(textured_image.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    small = cv2.resize(blurred, (64, 64), interpolation=cv2.INTER_LINEAR)

    def noisy(image):
        noise = np.random.default_rng(11).standard_normal(image.shape, dtype=np.float32) * np.float32(8.0)
        return np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)

    expected = cv2.resize(jpeg_roundtrip(noisy(small), 40), (256, 256), interpolation=cv2.INTER_CUBIC)
    out = apply_degradation(textured_image, params)
    assert np.abs(out.astype(int) - expected).max() <= 1
    noise_first = cv2.resize(jpeg_roundtrip(cv2.resize(noisy(blurred), (64, 64), interpolation=cv2.INTER_LINEAR), 40),
                             (256, 256), interpolation=cv2.INTER_CUBIC)
    assert np.abs(out.astype(float) - noise_first).mean() > 1.0

def test_config_round_trip_and_partial_dict():
    config = DegradationConfig(blur_sigma=(0.2, 10.0), jpeg_quality=(60, 100), downsample_interpolations=("linear",))
    assert DegradationConfig.from_dict(config.to_dict()) == config
    assert DegradationConfig.from_dict({"noise_sigma": [0, 15]}).noise_sigma == (0, 15)
    assert DegradationConfig.from_dict({}) == DegradationConfig()


@pytest.mark.parametrize(
    "options, field",
    [
        ({"blur_sigma": (5.0, 1.0)}, "blur_sigma"),
        ({"downsample_scale": (8.0, 2.0)}, "downsample_scale"),
        ({"noise_sigma": (-1.0, 5.0)}, "noise_sigma"),
        ({"jpeg_quality": (0, 90)}, "jpeg_quality"),
        ({"jpeg_quality": (30, 120)}, "jpeg_quality"),
        ({"blur_kernel_size": 40}, "blur_kernel_size"),
        ({"isotropic_prob": 1.5}, "isotropic_prob"),
        ({"downsample_interpolations": ("nearest",)}, "downsample_interpolations"),
        ({"blur_sigmas": (1, 2)}, "blur_sigmas"),
    ],
)
def test_bad_config_names_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        DegradationConfig.from_dict(options)


def test_degrade_rejects_non_uint8_rgb():
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        degrade(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0))


def test_downsample_reference_range(textured_image):
    image = cv2.resize(textured_image, (512, 512))
    out = downsample_reference(image, np.random.default_rng(0), min_size=64, max_size=64)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert high_frequency_energy(out) < 0.1 * high_frequency_energy(image)
    assert np.array_equal(downsample_reference(image, np.random.default_rng(0), min_size=512, max_size=512), image)
    with pytest.raises(ValueError, match="min_size"):
        downsample_reference(image, np.random.default_rng(0), min_size=600, max_size=512)
