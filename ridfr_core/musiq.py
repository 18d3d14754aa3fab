"""MUSIQ (Ke et al., ICCV 2021), the no-reference quality score behind RestorerID's adaptive identity scale.

RestorerID scores each LQ face with pyiqa's ``create_metric('musiq')``: the KonIQ-10k model that
IQA-PyTorch converted from Google's release and publishes as ``musiq_koniq_ckpt-e95806b9.pth`` (a plain
state dict). pyiqa itself drags in a dozen heavy packages, so this is a torch-only MUSIQ that reads that
file and computes the same score:

- the image in [-1, 1] is seen at three scales: resized (bicubic, aspect kept) so its longer side is 224,
  then 384, and at its own resolution; each is cut into 32x32 patches (TF "SAME" zero padding);
- each patch gets a hash-based spatial embedding (its row/column mapped onto a 10x10 grid) and the
  embedding of its scale, after a small ResNet stem (weight-standardised convs + GroupNorm) and a linear
  embedding of the 8x8x256 feature map (flattened height, width, channel as in TensorFlow);
- a 14-layer pre-norm transformer reads a class token plus all patches; the KonIQ head maps the class
  token to the score (about 0-100, higher is better).

pyiqa pads each resized scale to a fixed token count and masks the padding with a score of -1000 before
the softmax. Those keys get a weight of exp(-1000 - max), exactly 0 in float32 and below, so leaving the
padding out gives the same score with fewer tokens (and no mask).

Module and parameter names are the published ones, so the file loads key for key.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .weights.checkpoints import CheckpointError, load_strict, read_state_dict

PATCH = 32
HASH_GRID = 10                # hash-based spatial embedding: a 10x10 grid
RESIZED_SIDES = (224, 384)    # longer side of the resized scales; the image's own resolution is the third
STEM_WIDTH = 64
WIDTH, MLP_WIDTH, HEADS, LAYERS = 384, 1152, 6, 14
WHAT = "MUSIQ weights (musiq_koniq)"


# ----------------------------------------------------------------------------------------------
# Image -> patches with their spatial and scale positions


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding (before, after) of one side: the odd pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom))


def hashed_positions(rows: int, cols: int) -> torch.Tensor:
    """(rows*cols,) indices into the 10x10 embedding grid: each patch row/column is mapped onto the grid by
    nearest-neighbour resizing, so any patch count shares the same embeddings."""
    grid = torch.arange(HASH_GRID, dtype=torch.float32)[None, None]
    grid_rows = F.interpolate(grid, size=rows, mode="nearest")[0, 0]
    grid_cols = F.interpolate(grid, size=cols, mode="nearest")[0, 0]
    return (grid_rows[:, None] * HASH_GRID + grid_cols[None, :]).flatten().long()


def patches_of(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 3*32*32) patches in row-major order and their (N,) spatial positions."""
    rows, cols = math.ceil(image.shape[-2] / PATCH), math.ceil(image.shape[-1] / PATCH)
    patches = F.unfold(pad_same(image, PATCH, PATCH), PATCH, stride=PATCH).transpose(1, 2)
    return patches, hashed_positions(rows, cols)


def multiscale_tokens(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patches of images in [-1, 1] at every scale: (B, N, 3072) patches, (N,) spatial and (N,) scale ids."""
    height, width = images.shape[-2:]
    scaled = []
    for side in RESIZED_SIDES:
        ratio = side / max(height, width)
        size = (round(height * ratio), round(width * ratio))
        scaled.append(F.interpolate(images, size, mode="bicubic", align_corners=False))
    scaled.append(images)
    patches, spatial, scale = [], [], []
    for scale_id, image in enumerate(scaled):
        found, positions = patches_of(image)
        patches.append(found)
        spatial.append(positions)
        scale.append(torch.full_like(positions, scale_id))
    return torch.cat(patches, 1), torch.cat(spatial), torch.cat(scale)


# ----------------------------------------------------------------------------------------------
# The network (names as in the published state dict)


class StemConv(nn.Conv2d):
    """Bias-free conv with TF "SAME" padding; its weight is standardised once at load (:func:`standardise`)."""

    def __init__(self, channels: int, out_channels: int, kernel: int, stride: int = 1):
        super().__init__(channels, out_channels, kernel, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), self.weight, stride=self.stride)


def standardise(weight: torch.Tensor) -> torch.Tensor:
    """Weight standardisation (zero mean, unit sample std per output filter), as MUSIQ's ResNet applies it in
    every forward pass; it depends on the weights only, so it is done once, in float32."""
    weight = weight.float()
    weight = weight - weight.mean((1, 2, 3), keepdim=True)
    return weight / (weight.std((1, 2, 3), keepdim=True) + 1e-5)


class Bottleneck(nn.Module):
    """The stem's one ResNet bottleneck (64 -> 256 channels, stride 1, projected shortcut)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv1, self.gn1 = StemConv(channels, channels, 1), nn.GroupNorm(32, channels, eps=1e-4)
        self.conv2, self.gn2 = StemConv(channels, channels, 3), nn.GroupNorm(32, channels, eps=1e-4)
        self.conv3, self.gn3 = StemConv(channels, out_channels, 1), nn.GroupNorm(32, out_channels, eps=1e-4)
        self.conv_proj, self.gn_proj = StemConv(channels, out_channels, 1), nn.GroupNorm(32, out_channels, eps=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.gn_proj(self.conv_proj(x))
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return F.relu(self.gn3(self.conv3(x)) + shortcut)


class Embedding(nn.Module):
    """A learned table kept under the published parameter name (``position_emb``, ``scale_emb``)."""

    def __init__(self, name: str, *shape: int):
        super().__init__()
        self.name = name
        self.register_parameter(name, nn.Parameter(torch.zeros(shape)))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name).reshape(-1, WIDTH)[index]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape

        def heads(projection):
            return projection(x).reshape(batch, tokens, HEADS, WIDTH // HEADS).transpose(1, 2)

        weights = (heads(self.query) @ heads(self.key).transpose(-2, -1)) * (WIDTH // HEADS) ** -0.5
        mixed = weights.softmax(-1) @ heads(self.value)
        return self.out(mixed.transpose(1, 2).reshape(batch, tokens, WIDTH))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, MLP_WIDTH), nn.Linear(MLP_WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(WIDTH, eps=1e-6), Attention()
        self.norm2, self.mlp = nn.LayerNorm(WIDTH, eps=1e-6), Mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.posembed_input = Embedding("position_emb", 1, HASH_GRID * HASH_GRID, WIDTH)
        self.scaleembed_input = Embedding("scale_emb", len(RESIZED_SIDES) + 1, WIDTH)
        self.cls = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.encoder_norm = nn.LayerNorm(WIDTH, eps=1e-6)
        self.transformer = nn.ModuleDict({f"encoderblock_{i}": EncoderBlock() for i in range(LAYERS)})

    def forward(self, x: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = x + self.posembed_input(spatial) + self.scaleembed_input(scale)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        for block in self.transformer.values():
            x = block(x)
        return self.encoder_norm(x)


class Musiq(nn.Module):
    """MUSIQ with the KonIQ-10k head: ``model(images)`` -> (B,) scores of RGB images (B,3,H,W) in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.conv_root = StemConv(3, STEM_WIDTH, 7, 2)
        self.gn_root = nn.GroupNorm(32, STEM_WIDTH, eps=1e-6)
        self.block1 = Bottleneck(STEM_WIDTH, 4 * STEM_WIDTH)
        self.embedding = nn.Linear(4 * STEM_WIDTH * (PATCH // 4) ** 2, WIDTH)
        self.transformer_encoder = Encoder()
        self.head = nn.Linear(WIDTH, 1)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, 3072) patches -> (B, N, 384) tokens through the ResNet stem."""
        batch, tokens, _ = patches.shape
        x = patches.reshape(batch * tokens, 3, PATCH, PATCH)
        x = F.relu(self.gn_root(self.conv_root(x)))
        x = F.max_pool2d(pad_same(x, 3, 2), 3, 2)
        x = self.block1(x).permute(0, 2, 3, 1)  # TensorFlow's (height, width, channel) flattening
        return self.embedding(x.reshape(batch, tokens, -1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        dtype = self.head.weight.dtype
        with torch.no_grad():
            patches, spatial, scale = multiscale_tokens((images.to(self.head.weight.device).float() - 0.5) * 2)
            tokens = self.embed_patches(patches.to(dtype))
            encoded = self.transformer_encoder(tokens, spatial.to(tokens.device), scale.to(tokens.device))
            # the head in float32: a bfloat16 score near 50 would be rounded to steps of 0.25
            return F.linear(encoded[:, 0].float(), self.head.weight.float(), self.head.bias.float())[:, 0]


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"MUSIQ: expected RGB images (B, 3, H, W), got {shape}.")
    low, high = float(images.min()), float(images.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(f"MUSIQ: images must be in [0, 1], got values in [{low:.3g}, {high:.3g}].")


def load_musiq(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Musiq:
    """The published ``musiq_koniq`` state dict at ``path`` as a :class:`Musiq` in eval mode.

    Raises :class:`~ridfr_core.weights.checkpoints.CheckpointError` naming the file and the fix when it is missing,
    unreadable or not MUSIQ-KonIQ (wrong keys or shapes, e.g. the 10-class AVA model)."""
    state = read_state_dict(path, WHAT)
    with torch.device("meta"):
        model = Musiq()
    state = {name: tensor.float() if torch.is_floating_point(tensor) else tensor for name, tensor in state.items()}
    bad = sorted(name for name, tensor in state.items() if not torch.is_floating_point(tensor)
                 or not torch.isfinite(tensor).all())
    if bad:
        raise CheckpointError(f"{WHAT}: {path} has non-finite or non-float tensors ({', '.join(bad[:3])}); "
                              "the file is damaged: download it again (python -m ridfr_core.models download).")
    load_strict(model, state, path, WHAT)
    for module in model.modules():
        if isinstance(module, StemConv):
            module.weight = nn.Parameter(standardise(module.weight), requires_grad=False)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
