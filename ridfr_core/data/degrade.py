"""Synthetic degradation for training pairs and the evaluation split (paper Eq. 7).

    I_LQ = [(I_HQ * k_sigma) down_r + n_delta]_JPEG_q

followed by a bicubic resize back to the input size, because RIDFR takes the LQ face at 512 px.
Sampling and applying are separate (:func:`sample_params`, :func:`apply_degradation`) so that the
parameters of any LQ image can be logged, inspected and replayed exactly.

Default ranges are DifFace's SwinIR-Face ranges (blur sigma 0.1-15, scale 0.8-32, noise 0-20,
JPEG 30-100, 41 px kernel, isotropic/anisotropic 0.5/0.5): RIDFR targets severe, identity-obscure
inputs and these are at the severe end of what peer projects use (GFPGAN v1 is the mild end:
blur 0.1-10, scale 0.8-8, noise 0-20, JPEG 60-100).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


@dataclass(frozen=True)
class DegradationConfig:
    """Ranges Eq. 7's random parameters are drawn from (uniformly). Noise sigma is on the 0..255
    scale; ``downsample_scale`` is the factor r the image is shrunk by (r < 1 enlarges)."""

    blur_kernel_size: int = 41
    isotropic_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 15.0)
    anisotropic_rotation_deg: tuple[float, float] = (-180.0, 180.0)
    downsample_scale: tuple[float, float] = (0.8, 32.0)
    downsample_interpolations: tuple[str, ...] = ("area", "linear", "cubic")
    noise_sigma: tuple[float, float] = (0.0, 20.0)
    jpeg_quality: tuple[int, int] = (30, 100)

    def __post_init__(self):
        # Lists come back from JSON/YAML; store tuples so configs compare and hash by value.
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        self._validate()

    def _validate(self):
        k = self.blur_kernel_size
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"DegradationConfig.blur_kernel_size: {k!r} must be a positive odd integer (e.g. 41).")
        if not 0.0 <= self.isotropic_prob <= 1.0:
            raise ValueError(f"DegradationConfig.isotropic_prob: {self.isotropic_prob!r} must be in [0, 1].")
        _check_range("blur_sigma", self.blur_sigma, low=0.0)
        _check_range("anisotropic_rotation_deg", self.anisotropic_rotation_deg)
        _check_range("downsample_scale", self.downsample_scale, low=0.0, low_inclusive=False)
        _check_range("noise_sigma", self.noise_sigma, low=0.0)
        _check_range("jpeg_quality", self.jpeg_quality, low=1, high=100)
        if any(not isinstance(q, int) for q in self.jpeg_quality):
            raise ValueError(f"DegradationConfig.jpeg_quality: {self.jpeg_quality!r} must be two integers in 1..100.")
        unknown = [name for name in self.downsample_interpolations if name not in INTERPOLATIONS]
        if not self.downsample_interpolations or unknown:
            raise ValueError(
                f"DegradationConfig.downsample_interpolations: {self.downsample_interpolations!r} must be a non-empty "
                f"list drawn from {sorted(INTERPOLATIONS)}."
            )

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "DegradationConfig":
        """Missing keys keep their defaults; unknown keys are an error (they are usually typos)."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"DegradationConfig: unknown option(s) {unknown}; valid options are {sorted(known)}.")
        return cls(**values)


def _check_range(name, value, low=None, high=None, low_inclusive=True):
    if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"DegradationConfig.{name}: {value!r} must be a pair [min, max].")
    lo, hi = value
    if lo > hi:
        raise ValueError(f"DegradationConfig.{name}: min {lo} is greater than max {hi}; give [min, max].")
    too_low = low is not None and (lo < low if low_inclusive else lo <= low)
    if too_low or (high is not None and hi > high):
        bound = f"{'>=' if low_inclusive else '>'} {low}" if low is not None else ""
        if high is not None:
            bound += f"{' and ' if bound else ''}<= {high}"
        raise ValueError(f"DegradationConfig.{name}: {value!r} is out of bounds; both ends must be {bound}.")


@dataclass(frozen=True)
class DegradationParams:
    """One draw of Eq. 7's parameters. ``None`` disables a stage (useful for tests and ablations);
    ``noise_seed`` makes the noise field itself part of the record, so replay is exact."""

    blur_sigma_x: float | None
    blur_sigma_y: float | None
    blur_rotation_deg: float
    blur_kernel_size: int
    downsample_scale: float
    downsample_interpolation: str
    noise_sigma: float
    noise_seed: int
    jpeg_quality: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def sample_params(rng: np.random.Generator, config: DegradationConfig = DegradationConfig()) -> DegradationParams:
    """Draw one set of degradation parameters; the draw order is fixed, so a seed fixes the result."""
    if rng.random() < config.isotropic_prob:
        sigma_x = sigma_y = float(rng.uniform(*config.blur_sigma))
        rotation = 0.0
    else:
        sigma_x, sigma_y = (float(s) for s in rng.uniform(*config.blur_sigma, size=2))
        rotation = float(rng.uniform(*config.anisotropic_rotation_deg))
    return DegradationParams(
        blur_sigma_x=sigma_x,
        blur_sigma_y=sigma_y,
        blur_rotation_deg=rotation,
        blur_kernel_size=config.blur_kernel_size,
        downsample_scale=float(rng.uniform(*config.downsample_scale)),
        downsample_interpolation=str(rng.choice(config.downsample_interpolations)),
        noise_sigma=float(rng.uniform(*config.noise_sigma)),
        noise_seed=int(rng.integers(0, 2**63 - 1)),
        jpeg_quality=int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1)),
    )


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, rotation_deg: float = 0.0) -> np.ndarray:
    """Normalised (an)isotropic Gaussian kernel, covariance R diag(sx^2, sy^2) R^T."""
    sigma_x, sigma_y = max(sigma_x, 1e-3), max(sigma_y, 1e-3)  # sigma 0 means "no blur", a delta
    theta = math.radians(rotation_deg)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    covariance = rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T
    inverse = np.linalg.inv(covariance)
    half = size // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    exponent = inverse[0, 0] * x * x + (inverse[0, 1] + inverse[1, 0]) * x * y + inverse[1, 1] * y * y
    kernel = np.exp(-0.5 * exponent)
    return (kernel / kernel.sum()).astype(np.float32)


def apply_degradation(image: np.ndarray, params: DegradationParams) -> np.ndarray:
    """Apply Eq. 7 with fixed parameters to a uint8 HxWx3 RGB image; returns uint8 of the same size."""
    _check_image(image, "apply_degradation")
    height, width = image.shape[:2]
    work = image.astype(np.float32)
    if params.blur_sigma_x is not None:
        work = _blur(work, params)
    small_size = (max(1, round(width / params.downsample_scale)), max(1, round(height / params.downsample_scale)))
    if small_size != (width, height):
        work = cv2.resize(work, small_size, interpolation=INTERPOLATIONS[params.downsample_interpolation])
    if params.noise_sigma > 0:
        noise = np.random.default_rng(params.noise_seed).standard_normal(work.shape, dtype=np.float32)
        work = work + noise * np.float32(params.noise_sigma)
    work = np.clip(np.rint(work), 0, 255).astype(np.uint8)
    if params.jpeg_quality is not None:
        work = jpeg_roundtrip(work, params.jpeg_quality)
    if work.shape[:2] != (height, width):
        work = cv2.resize(work, (width, height), interpolation=cv2.INTER_CUBIC)  # uint8: saturates
    return work


def _blur(image: np.ndarray, params: DegradationParams) -> np.ndarray:
    size = params.blur_kernel_size
    if params.blur_sigma_x == params.blur_sigma_y:
        # The isotropic kernel is separable: same result as filter2D at under half the cost.
        line = gaussian_kernel(size, params.blur_sigma_x, params.blur_sigma_x)[size // 2]
        line = line / line.sum()
        return cv2.sepFilter2D(image, -1, line, line, borderType=cv2.BORDER_REFLECT_101)
    kernel = gaussian_kernel(size, params.blur_sigma_x, params.blur_sigma_y, params.blur_rotation_deg)
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode as JPEG (OpenCV's codec expects BGR, so convert around it)."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {image.shape} at quality {quality}.")
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def degrade(
    image: np.ndarray,
    rng: np.random.Generator,
    config: DegradationConfig = DegradationConfig(),
    return_params: bool = False,
):
    """Random Eq. 7 degradation of a uint8 HxWx3 RGB image, resized back to its own size.

    Deterministic for a given ``rng`` state. With ``return_params=True`` returns
    ``(lq, params)`` so the draw can be logged or replayed with :func:`apply_degradation`.
    """
    params = sample_params(rng, config)
    degraded = apply_degradation(image, params)
    return (degraded, params) if return_params else degraded


def downsample_reference(
    image: np.ndarray, rng: np.random.Generator, min_size: int = 64, max_size: int = 512
) -> np.ndarray:
    """Simulate an ID image of uneven quality: shrink the longer side to a random size in
    [min_size, max_size] (area), then bicubic back to the original size. No-op when the drawn
    size is not smaller than the image."""
    _check_image(image, "downsample_reference")
    if not 1 <= min_size <= max_size:
        raise ValueError(f"downsample_reference: min_size={min_size}, max_size={max_size}; need 1 <= min <= max.")
    height, width = image.shape[:2]
    target = int(rng.integers(min_size, max_size + 1))
    scale = target / max(height, width)
    if scale >= 1.0:
        return image.copy()
    small = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def _check_image(image: np.ndarray, caller: str):
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        described = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{caller}: expected a uint8 HxWx3 RGB image, got a {described}; convert it first "
                         "(float [0, 1]: np.rint(image * 255).astype(np.uint8); grayscale: np.repeat(image[..., None], 3, 2)).")
