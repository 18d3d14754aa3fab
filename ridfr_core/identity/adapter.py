"""Identity Injection Module: IP-Adapter-FaceID-Plus(v2) projection and decoupled cross-attention.

RIDFR (paper Sec. 3.2) takes this module as published and keeps it frozen: an ArcFace embedding goes
through an MLP and queries CLIP ViT-H/14 penultimate features with a perceiver (diffusers'
``IPAdapterFaceIDPlusImageProjection``, v2 adds the shortcut), and the resulting identity tokens
enter every UNet cross-attention as ``Attn(Q,K,V) + scale * Attn(Q,K',V')`` (Eq. 3).

The attention math lives in :func:`identity_attention` so that the diffusers backend
(:class:`IdentityAttnProcessor`) and the ComfyUI patch compute exactly the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

from ..constants import CLIP_SIZE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ID_TOKENS = 4


@dataclass
class Identity:
    """The identity condition for a batch of faces.

    ``id_embeds``: (B, 512) L2-normalised ArcFace embeddings (insightface ``normed_embedding``,
    the convention FaceID-Plus was trained with). ``clip_embeds``: (B, 257, 1280) penultimate
    hidden states of CLIP ViT-H/14 on the aligned face crop. B is 1 (broadcast to every face) or
    the number of faces.
    """

    id_embeds: torch.Tensor
    clip_embeds: torch.Tensor

    def __post_init__(self):
        if self.id_embeds.ndim == 1:
            self.id_embeds = self.id_embeds[None]
        if self.clip_embeds.ndim == 2:
            self.clip_embeds = self.clip_embeds[None]
        if self.id_embeds.shape[0] != self.clip_embeds.shape[0]:
            raise ValueError(
                f"Identity: {self.id_embeds.shape[0]} ArcFace embeddings but {self.clip_embeds.shape[0]} "
                "CLIP feature sets; give one of each per reference face."
            )

    def __len__(self) -> int:
        return self.id_embeds.shape[0]

    def broadcast_to(self, batch: int) -> "Identity":
        """One identity for the whole batch, or one per face: anything else is the caller's error."""
        if len(self) == batch:
            return self
        if len(self) == 1:
            return Identity(self.id_embeds.expand(batch, -1), self.clip_embeds.expand(batch, -1, -1))
        raise ValueError(
            f"{len(self)} identities for {batch} faces: give one identity for all faces or one per face."
        )

    @staticmethod
    def cat(identities: list["Identity"]) -> "Identity":
        return Identity(
            torch.cat([i.id_embeds for i in identities]), torch.cat([i.clip_embeds for i in identities])
        )


def null_identity(clip_vision, batch: int = 1) -> Identity:
    """The "no identity" condition of FaceID-Plus: a zero ArcFace embedding and the CLIP features of an
    all-zero (normalised) image, as the reference implementation builds its unconditional tokens."""
    param = next(clip_vision.parameters())
    pixels = torch.zeros(1, 3, CLIP_SIZE, CLIP_SIZE, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        clip = clip_vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    return Identity(torch.zeros(1, 512, device=param.device), clip.float()).broadcast_to(batch)


def clip_pixel_values(crops: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB in [0,1] -> CLIP-normalised 224x224 input (what CLIPImageProcessor would give
    for the square face crops used here, without needing its preprocessor files)."""
    if crops.shape[-2:] != (CLIP_SIZE, CLIP_SIZE):
        crops = F.interpolate(crops, size=(CLIP_SIZE, CLIP_SIZE), mode="bicubic", antialias=True)
    mean = crops.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = crops.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (crops.clamp(0, 1) - mean) / std


@torch.no_grad()
def encode_clip_features(clip_vision, crops: torch.Tensor, bgr: bool = False) -> torch.Tensor:
    """Penultimate CLIP ViT-H/14 hidden states (B, 257, 1280) of aligned face crops (B,3,H,W) RGB in [0,1].
    ``bgr``: hand CLIP the crops in BGR order, as RestorerID's training and inference did (cv2 images)."""
    param = next(clip_vision.parameters())
    crops = crops.flip(1) if bgr else crops
    pixels = clip_pixel_values(crops.to(param.device, torch.float32)).to(param.dtype)
    return clip_vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def identity_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int
) -> torch.Tensor:
    """Multi-head Attn(Q, K, V) on (B, L, C) tensors, heads split inside; returns (B, L, C).

    Used for both branches of Eq. 3: the text attention Attn(Q, K, V) and the identity one Attn(Q, K', V')."""
    batch, _, channels = query.shape
    head_dim = channels // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(query), split(keys), split(values))
    return out.transpose(1, 2).reshape(batch, -1, channels)


def scale_per_sample(scale: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A float, or a (B,) tensor broadcast over tokens and channels of a (B, L, C) tensor."""
    if isinstance(scale, torch.Tensor):
        return scale.to(like.device, like.dtype).view(-1, 1, 1)
    return scale


class IdentityAttnProcessor(IPAdapterAttnProcessor2_0):
    """Decoupled cross-attention for diffusers' ``Attention`` with the published weight layout
    (``to_k_ip.0`` / ``to_v_ip.0``) and a per-face identity scale.

    diffusers' own processor takes one float scale per adapter; RIDFR needs a scale per face (a face
    matched to nobody is restored with scale 0 in the same batch), so ``__call__`` is re-stated here
    around :func:`identity_attention`. ``encoder_hidden_states`` is :func:`identity_context`'s tuple
    ``(text_states, [id_tokens], identity_scale)``, or those keys and values computed once for a whole
    restoration (:class:`FixedKeysValues`): diffusers' UNet hands it unchanged to every cross-attention, so
    the scale travels with the call (no state on the shared processors).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if isinstance(encoder_hidden_states, FixedKeysValues):
            keys, values, id_keys, id_values = encoder_hidden_states.by_attention[attn]
            scale = encoder_hidden_states.scale
        elif isinstance(encoder_hidden_states, tuple) and len(encoder_hidden_states) == 3:
            text_states, id_tokens, scale = encoder_hidden_states
            id_tokens = id_tokens[0] if isinstance(id_tokens, (list, tuple)) else id_tokens
            keys, values, id_keys, id_values = self.keys_values(attn, text_states, id_tokens, scale)
        else:
            raise ValueError(
                "IdentityAttnProcessor: encoder_hidden_states must be the tuple (text_states, [id_tokens], "
                f"identity_scale) or FixedKeysValues; got {type(encoder_hidden_states).__name__}. Call the UNet "
                "through RIDFRDenoiser, which builds it with identity_context."
            )
        query = attn.to_q(hidden_states)
        out = identity_attention(query, keys, values, attn.heads)
        if id_keys is not None:
            id_out = identity_attention(query, id_keys, id_values, attn.heads)
            out = out + scale_per_sample(scale, id_out) * id_out
        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def keys_values(self, attn, text_states: torch.Tensor, id_tokens: torch.Tensor, scale) -> tuple:
        """(K, V, K', V') of Eq. 3 for ``attn``; K', V' are None when the identity's scale is the float 0."""
        with_identity = isinstance(scale, torch.Tensor) or scale != 0
        return (attn.to_k(text_states), attn.to_v(text_states),
                self.to_k_ip[0](id_tokens) if with_identity else None,
                self.to_v_ip[0](id_tokens) if with_identity else None)


@dataclass(frozen=True)
class FixedKeysValues:
    """A UNet's cross-attention input when text states, identity tokens and scale stay the same over a
    restoration's steps: every identity cross-attention's keys and values, computed once
    (:func:`fixed_keys_values`) instead of at every step. Handed to the UNet as ``encoder_hidden_states``."""

    by_attention: dict  # diffusers Attention module -> (K, V, K', V')
    scale: float | torch.Tensor


class IdentityAdapter(torch.nn.Module):
    """The frozen Identity Injection Module: FaceID-Plus projection + one K'/V' pair per cross-attention.

    ``attn_processors`` is keyed by the diffusers UNet's cross-attention processor names (with dots
    replaced by ``__``), in the order the published ``ip_adapter`` keys ``1, 3, 5, ...`` follow.
    """

    def __init__(self, image_proj: IPAdapterFaceIDPlusImageProjection, processors: dict[str, IdentityAttnProcessor],
                 shortcut: bool):
        super().__init__()
        self.image_proj = image_proj
        self.attn_processors = torch.nn.ModuleDict({k.replace(".", "__"): v for k, v in processors.items()})
        self.shortcut = shortcut

    def processors_by_unet_name(self) -> dict[str, IdentityAttnProcessor]:
        return {k.replace("__", "."): v for k, v in self.attn_processors.items()}

    def identity_tokens(self, identity: Identity, shortcut_scale: float = 1.0) -> torch.Tensor:
        """(B, 4, cross_attention_dim) identity tokens c_ID. Constant over denoising steps: compute once."""
        param = next(self.image_proj.parameters())
        proj = self.image_proj
        proj.clip_embeds = identity.clip_embeds.to(param.device, param.dtype)[:, None]
        proj.shortcut, proj.shortcut_scale = self.shortcut, shortcut_scale
        try:
            return proj(identity.id_embeds.to(param.device, param.dtype))
        finally:
            proj.clip_embeds = None


def identity_context(text_states: torch.Tensor, id_tokens: torch.Tensor, identity_scale: float | torch.Tensor):
    """The cross-attention context of a UNet whose processors are an :class:`IdentityAdapter`'s: text
    states, identity tokens and the identity scale (a float or per-face (B,) tensor) of this call."""
    return text_states, [id_tokens.to(text_states.dtype)], identity_scale


def fixed_keys_values(unet, text_states: torch.Tensor, id_tokens: torch.Tensor,
                      identity_scale: float | torch.Tensor) -> FixedKeysValues:
    """:class:`FixedKeysValues` of every cross-attention of ``unet`` whose processor is an adapter's."""
    text_states, (id_tokens,), scale = identity_context(text_states, id_tokens, identity_scale)
    return FixedKeysValues({attn: attn.processor.keys_values(attn, text_states, id_tokens, scale)
                            for attn in unet.modules()
                            if isinstance(attn, Attention) and isinstance(attn.processor, IdentityAttnProcessor)},
                           scale)


def identity_processor_slots(unet) -> list[tuple[int, str, IdentityAttnProcessor]]:
    """A fresh processor for each UNet cross-attention, with its position in ``unet.attn_processors``
    (the published ``ip_adapter`` keys are numbered by that position: ``1.to_k_ip``, ``3.to_k_ip``, ...)."""
    channels = unet.config.block_out_channels
    slots = []
    for index, name in enumerate(unet.attn_processors):
        if not name.endswith("attn2.processor"):
            continue
        block = name.split(".")[1]
        hidden = (channels[-1] if name.startswith("mid_block") else
                  list(reversed(channels))[int(block)] if name.startswith("up_blocks") else channels[int(block)])
        slots.append((index, name, IdentityAttnProcessor(hidden, unet.config.cross_attention_dim,
                                                         num_tokens=(ID_TOKENS,))))
    return slots


def build_identity_adapter(unet, clip_hidden: int = 1280, shortcut: bool = True) -> IdentityAdapter:
    """A FaceID-Plus(v2)-shaped adapter with random weights, for benchmarks (speed does not depend on
    weight values); real weights come from :func:`ridfr_core.weights.adapter_files.load_identity_adapter`."""
    cross = unet.config.cross_attention_dim
    image_proj = IPAdapterFaceIDPlusImageProjection(embed_dims=cross, output_dims=cross, hidden_dims=clip_hidden,
                                                    heads=cross // 64)
    processors = {name: processor for _, name, processor in identity_processor_slots(unet)}
    return IdentityAdapter(image_proj, processors, shortcut).requires_grad_(False)


def install_identity_processors(unet, adapter: IdentityAdapter) -> None:
    """Make the adapter's attention modules the UNet's cross-attention processors (shared, not copied), and
    plain attention everywhere else: the UNet belongs to the denoiser built around it from then on."""
    identity_processors = adapter.processors_by_unet_name()
    unet.set_attn_processor({name: identity_processors.get(name, AttnProcessor2_0()) for name in unet.attn_processors})
