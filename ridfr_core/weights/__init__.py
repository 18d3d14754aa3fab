"""Reading weight files, offline and without running pickled code: the SD1.5 base, CLIP vision, the
FaceID Plus adapter. Nothing here knows a content backend."""
