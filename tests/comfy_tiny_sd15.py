"""Test support: lets ComfyUI load the tests' tiny SD1.5-architecture checkpoint with its own loaders.

ComfyUI detects a checkpoint's UNet configuration from the weights and then looks it up in
``comfy.supported_models.models``; the tiny UNet (32 channels, 64-d text context) matches no real
model, so this registers one more SD1.5 family member whose UNet and text-encoder sizes come from the
tiny config set (the same JSON files that build the tiny weights, kept in ``models/ridfr/configs`` where
LoadRIDFR also reads them). ComfyUI builds every SD-style VAE 128 channels wide; for a narrower one (the
publisher's tiny RestorerID checkpoint has a 32-wide VAE) the width is read from the weights, as ComfyUI
reads the UNet's. Everything else (LDM key layout, latent format, sampling, the VAE code) is ComfyUI's SD1.5 code.

Used two ways: dropped into ``custom_nodes/`` of the test server (registered on import from the server's
``models/ridfr/configs``, no nodes), and imported in-process by the node tests (``register(config_dir)``).
"""

from __future__ import annotations

import json
from pathlib import Path

NODE_CLASS_MAPPINGS: dict = {}


def register(config_dir: Path) -> None:
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    if not (Path(config_dir) / "unet.json").is_file() or any(
            model.__name__ == "TinySD15" for model in comfy.supported_models.models):
        return
    unet = json.loads((Path(config_dir) / "unet.json").read_text())
    text = json.loads((Path(config_dir) / "text_encoder.json").read_text())
    with open(Path(comfy.sd1_clip.__file__).parent / "sd1_clip_config.json") as handle:
        text_config = {**json.load(handle), **text}

    class TinyClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options=model_options, return_projected_pooled=False,
                             textmodel_json_config=text_config)

    class TinySD1ClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TinyClipModel,
                             **kwargs)

    class TinySD15(comfy.supported_models.SD15):
        unet_config = {"context_dim": unet["cross_attention_dim"], "model_channels": unet["block_out_channels"][0],
                       "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False}
        unet_extra_config = {"num_heads": unet["attention_head_dim"], "num_head_channels": -1}

        def clip_target(self, state_dict={}):
            return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinySD1ClipModel)

    comfy.supported_models.models.insert(0, TinySD15)
    read_vae_width()


def read_vae_width() -> None:
    """ComfyUI's VAE with the width of an SD-style VAE's weights (``encoder.conv_in``) instead of SD's 128."""
    import comfy.sd

    original = comfy.sd.VAE.__init__

    def init(self, sd=None, device=None, config=None, *args, **kwargs):
        conv = sd.get("encoder.conv_in.weight") if isinstance(sd, dict) else None
        if config is None and conv is not None and conv.ndim == 4 and conv.shape[0] != 128 and "post_quant_conv.weight" in sd:
            ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                        "ch": conv.shape[0], "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                        "dropout": 0.0}
            config = {"params": {"ddconfig": ddconfig, "embed_dim": sd["post_quant_conv.weight"].shape[1]}}
        original(self, sd, device, config, *args, **kwargs)

    comfy.sd.VAE.__init__ = init


try:
    import folder_paths  # only inside ComfyUI
except ImportError:
    pass
else:
    register(Path(folder_paths.models_dir) / "ridfr" / "configs")
