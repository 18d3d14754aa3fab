"""References -> one identity, consistency report, and face-to-identity matching."""

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from ridfr_core.faces import (FaceInputError, NoFaceError, build_identity, check_consistency, combine_identity,
                              encode_references, load_face_analyzer, match_faces)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def unit(vector):
    vector = np.asarray(vector, np.float64)
    return vector / np.linalg.norm(vector)


def person(seed, count, spread=0.3):
    """``count`` embeddings of one synthetic person: a centre plus noise (ArcFace-like cosines ~0.9)."""
    rng = np.random.default_rng(seed)
    centre = unit(rng.standard_normal(512))
    return np.stack([unit(centre + spread * unit(rng.standard_normal(512))) for _ in range(count)]), centre


class TinyClip(torch.nn.Module):
    """Stands in for CLIP ViT-H/14: (B,257,C) hidden states that depend on the pixels."""

    def __init__(self, channels=8):
        super().__init__()
        self.proj = torch.nn.Linear(3, channels)

    def forward(self, pixel_values, output_hidden_states=True):
        tokens = torch.nn.functional.adaptive_avg_pool2d(pixel_values, 16).flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        hidden = self.proj(tokens)
        return SimpleNamespace(hidden_states=[hidden, hidden * 2, hidden * 3])


def test_combine_is_weighted_mean_of_normalised_embeddings():
    embeddings = np.array([[3.0, 0, 0], [0, 1.0, 0]])  # unnormalised on purpose
    clip = torch.stack([torch.zeros(257, 4), torch.ones(257, 4)])
    identity = combine_identity(embeddings, clip, weights=[3.0, 1.0])
    np.testing.assert_allclose(identity.id_embeds.numpy(), [unit([0.75, 0.25, 0])], atol=1e-6)
    assert identity.id_embeds.shape == (1, 3) and identity.clip_embeds.shape == (1, 257, 4)
    torch.testing.assert_close(identity.clip_embeds, torch.full((1, 257, 4), 0.25))


def test_combine_refuses_mismatched_batches_and_bad_weights():
    with pytest.raises(FaceInputError, match="3 ArcFace embeddings, 2 CLIP feature sets and 3 weights"):
        combine_identity(np.ones((3, 512)), torch.zeros(2, 257, 8), [1, 1, 1])
    with pytest.raises(FaceInputError, match="weights"):
        combine_identity(np.ones((2, 512)), torch.zeros(2, 257, 8), [1, -1])


def test_consistency_flags_the_reference_of_someone_else():
    own, _ = person(0, 4)
    stranger, _ = person(1, 1)
    report = check_consistency(np.concatenate([own[:2], stranger, own[2:]]))
    assert report.outliers == [2]
    assert "reference 2 looks like someone else" in report.summary()
    assert check_consistency(own).warnings == [] and check_consistency(own).mean_similarity > 0.5
    pair = check_consistency(np.concatenate([own[:1], stranger]))
    assert pair.outliers == [] and "different people" in pair.warnings[0]


def test_matching_assigns_the_right_identity():
    alice, alice_centre = person(10, 2)
    bob, bob_centre = person(11, 2)
    carol, _ = person(12, 1)
    faces = np.stack([bob[0], carol[0], alice[0]])
    matches = match_faces(faces, np.stack([alice_centre, bob_centre]))
    assert matches.identity == [1, None, 0]
    assert "face 1: no match" in matches.summary(["alice", "bob"])
    # Two faces closest to the same person: one per identity unless allowed otherwise.
    twins = np.stack([alice[0], alice[1]])
    assert sorted(match_faces(twins, np.stack([alice_centre, bob_centre]), threshold=-1).identity) == [0, 1]
    assert match_faces(twins, np.stack([alice_centre, bob_centre]), one_face_per_identity=False).identity == [0, 0]
    assert match_faces(np.zeros((0, 512)), np.stack([alice_centre])).identity == []



def test_matching_ignores_the_scores_of_pairs_below_the_threshold():
    """Face 0 is clearly identity 0 (0.9). Counting the raw -0.9 of face 1 / identity 1, a pair that
    is below the threshold anyway, made the swap (0.25 + 0.3) look better than keeping face 0 with
    its own identity (0.9 - 0.9)."""
    identities = np.eye(3)[:2]
    faces = np.array([[0.9, 0.25, np.sqrt(1 - 0.9**2 - 0.25**2)], [0.3, -0.9, np.sqrt(1 - 0.3**2 - 0.9**2)]])
    matches = match_faces(faces, identities, threshold=0.2)
    np.testing.assert_allclose(matches.similarity, [[0.9, 0.25], [0.3, -0.9]], atol=1e-12)
    assert matches.identity == [0, None]
    assert matches.summary() == ("face 0: identity 0 (similarity 0.90)\n"
                                 "face 1: no match (identity 0 at 0.30 went to face 0, which resembles them more)")

def test_references_from_real_photos_build_one_identity(yunet_models_root, face_data):
    analyzer = load_face_analyzer(models_root=yunet_models_root)
    unaligned = face_data / "unaligned"
    photos = [cv2.imread(str(unaligned / name))[:, :, ::-1] for name in ("obama_obama.jpg", "obama_obama2.jpg")]
    refs = encode_references(analyzer, photos)
    aligned_refs = sorted((face_data / "celebref-mini" / "00005" / "refs").glob("*.jpg"))[:2]
    aligned = encode_references(analyzer, [cv2.imread(str(p))[:, :, ::-1] for p in aligned_refs], aligned=True)
    for ref in refs + aligned:
        assert ref.clip_crop.shape == (224, 224, 3) and abs(np.linalg.norm(ref.embedding) - 1) < 1e-5
        assert 0 < ref.weight <= 1
    assert aligned[0].det_score == 1.0
    identity, report = build_identity(refs + aligned, TinyClip())
    assert identity.id_embeds.shape == (1, 512) and identity.clip_embeds.shape == (1, 257, 8)
    assert report.similarity.shape == (4, 4)
    assert "4 reference(s)" in report.summary()


def test_reference_without_a_face_or_with_a_bad_index(scripted_models_root):
    analyzer = load_face_analyzer(models_root=scripted_models_root, device="cpu")
    with pytest.raises(NoFaceError, match="reference 1: no face found"):
        encode_references(analyzer, [np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8),
                                     np.zeros((200, 200, 3), np.uint8)])
    with pytest.raises(FaceInputError, match="2 indices for 1 reference"):
        encode_references(analyzer, [np.zeros((200, 200, 3), np.uint8)], face_index=[0, 0])
    with pytest.raises(FaceInputError, match="square"):
        encode_references(analyzer, [np.zeros((200, 300, 3), np.uint8)], aligned=True)
