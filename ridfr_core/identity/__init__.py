"""The identity module: IP-Adapter FaceID Plus (ArcFace -> tokens, decoupled attention), its cache of
reference embeddings for training, and embedding helpers."""
