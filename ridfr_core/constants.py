"""Sizes and choices shared by the core and the ComfyUI nodes, in a module that imports nothing heavy
(the nodes read it when ComfyUI builds their schemas, before torch-heavy modules are wanted)."""

FACE_SIZE = 512                  # aligned faces (FFHQ template), what RIDFR restores and the paper evaluates at
LATENT_FACTOR = 8                # SD1.5's VAE: pixels per latent pixel along each side
LATENT_CHANNELS = 4              # SD1.5's VAE latent channels
CLIP_SIZE = 224                  # CLIP ViT-H/14 input, also the ArcFace-aligned crop it encodes
ON_NO_FACE = ("error", "skip")   # what to do with a photo where no face is found
