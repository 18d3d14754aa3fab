"""Files in and out: images (orientation, colour profile, metadata) and atomic writes."""
