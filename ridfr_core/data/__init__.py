"""Training and evaluation data: folders of faces, the paper's online degradation (Eq. 7), seeded streams."""
