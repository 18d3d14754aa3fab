"""Whole photos: detect -> align -> one restore batch -> paste back; unmatched faces; no-face policy;
aligned mode."""

import cv2
import numpy as np
import pytest
import torch

from ridfr_core.faces import (FaceInputError, NoFaceError, encode_references, load_face_analyzer, restore_aligned,
                              restore_faces_in_photo, restore_photo)
from ridfr_core.faces.align import upscale_image

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class RecordingRestorer:
    """A restore_fn that inverts colours (so pasted faces are visible) and records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, aligned, identity_scales, identity_index):
        self.calls.append((aligned.shape, identity_scales.tolist(), list(identity_index)))
        return 1.0 - aligned


def identity_restorer(aligned, identity_scales, identity_index):
    return aligned.clone()


@pytest.fixture(scope="module")
def yunet(yunet_models_root):
    return load_face_analyzer(models_root=yunet_models_root)


@pytest.fixture(scope="module")
def group_photo(face_data):
    return np.ascontiguousarray(cv2.imread(str(face_data / "unaligned" / "group_two_people.jpg"))[:, :, ::-1])


@pytest.mark.parametrize("upscale", [1.0, 2.0])
def test_group_photo_faces_restored_in_one_batch_rest_untouched(yunet, group_photo, upscale):
    restorer = RecordingRestorer()
    result = restore_faces_in_photo(yunet, group_photo, restorer, upscale=upscale)
    assert len(restorer.calls) == 1 and restorer.calls[0][0] == (2, 3, 512, 512)
    assert restorer.calls[0][1] == [1.0, 1.0] and restorer.calls[0][2] == [0, 0]
    base = upscale_image(group_photo, upscale)
    assert result.image.shape == base.shape and result.masks.shape == (2,) + base.shape[:2]
    outside = result.masks.max(axis=0) == 0
    np.testing.assert_array_equal(result.image[outside], base[outside])
    for face, mask in zip(result.faces, result.masks):
        x, y = (face.kps[2] * upscale + (upscale - 1) / 2).astype(int)  # the nose
        assert mask[y, x] == 1.0
        assert np.abs(result.image[y, x].astype(int) - (255 - base[y, x].astype(int))).max() <= 40
    assert result.aligned.shape == result.restored.shape == (2, 3, 512, 512)


def test_identity_restorer_reproduces_the_photo(yunet, group_photo):
    result = restore_faces_in_photo(yunet, group_photo, identity_restorer)
    inside = result.masks.max(axis=0) > 0.99
    assert np.abs(result.image[inside].astype(int) - group_photo[inside]).mean() < 3.0


def test_faces_matched_to_identities_by_reference(yunet, group_photo):
    """References cut from the photo itself: each face must get the identity made from it."""
    faces = yunet.detect(group_photo)
    left, right = sorted(faces, key=lambda face: face.bbox[0])
    cuts = []
    for face in (right, left):
        x1, y1, x2, y2 = face.bbox.astype(int)
        pad = (x2 - x1) // 2
        cuts.append(cv2.resize(group_photo[max(y1 - pad, 0):y2 + pad, max(x1 - pad, 0):x2 + pad], None, fx=1.5, fy=1.5))
    identities = np.stack([ref.embedding for ref in encode_references(yunet, cuts)])  # 0 = right, 1 = left
    restorer = RecordingRestorer()
    result = restore_faces_in_photo(yunet, group_photo, restorer, identity_embeddings=identities,
                                    match_threshold=0.5)
    by_position = {round(face.bbox[0]): index for face, index in zip(result.faces, result.identity_index)}
    assert by_position[round(left.bbox[0])] == 1 and by_position[round(right.bbox[0])] == 0


@pytest.mark.parametrize("unmatched", ["restore_without_identity", "keep_original"])
def test_unmatched_faces(yunet, group_photo, unmatched):
    faces = yunet.detect(group_photo)
    restorer = RecordingRestorer()
    result = restore_photo(group_photo, faces, restorer, identity_index=[0, None], identity_scale=0.8,
                           unmatched=unmatched)
    if unmatched == "keep_original":
        assert restorer.calls[0][1:] == ([pytest.approx(0.8)], [0])
        assert result.masks[1].max() == 0 and result.restored_faces == [True, False]
        torch.testing.assert_close(result.restored[1], result.aligned[1])
    else:
        assert restorer.calls[0][1:] == ([pytest.approx(0.8), 0.0], [0, None])
        assert result.masks[1].max() == 1.0


def test_no_face_error_or_skip(scripted_models_root):
    analyzer = load_face_analyzer(models_root=scripted_models_root, device="cpu")
    empty = np.zeros((120, 160, 3), np.uint8)
    with pytest.raises(NoFaceError, match="aligned"):
        restore_faces_in_photo(analyzer, empty, identity_restorer)
    restorer = RecordingRestorer()
    result = restore_faces_in_photo(analyzer, empty, restorer, on_no_face="skip", upscale=2.0)
    assert result.skipped and restorer.calls == [] and result.masks.shape == (0, 240, 320)
    np.testing.assert_array_equal(result.image, upscale_image(empty, 2.0))
    with pytest.raises(FaceInputError, match="on_no_face"):
        restore_faces_in_photo(analyzer, empty, identity_restorer, on_no_face="ignore")


def test_8k_photo_restores_only_the_face_region(scripted_models_root):
    analyzer = load_face_analyzer(models_root=scripted_models_root, device="cpu")
    photo = np.zeros((4320, 7680, 3), np.uint8)
    photo[::7, ::5] = 200
    result = restore_faces_in_photo(analyzer, photo, RecordingRestorer())
    touched = result.masks[0] > 0
    assert 0 < touched.mean() < 0.2
    changed = (result.image != photo).any(axis=2)
    assert changed.any() and not (changed & ~touched).any()


def test_restorer_returning_the_wrong_batch_is_reported(yunet, group_photo):
    faces = yunet.detect(group_photo)
    with pytest.raises(FaceInputError, match="restore_fn returned .*1, 3, 512, 512.* for 2 faces"):
        restore_photo(group_photo, faces, lambda aligned, scales, index: aligned[:1])
    with pytest.raises(FaceInputError, match="identity_index: 3 entries for 2 faces"):
        restore_photo(group_photo, faces, identity_restorer, identity_index=[0, 0, 0])


def test_aligned_mode_takes_crops_as_they_are(face_data):
    crops = [cv2.imread(str(path))[:, :, ::-1] for path in sorted((face_data / "obama-realworld" / "lq").glob("*.png"))[:3]]
    restorer = RecordingRestorer()
    restored = restore_aligned(crops, restorer, identity_index=[0, None, 0])
    assert restored.shape == (3, 3, 512, 512)
    assert restorer.calls[0][1] == [1.0, 0.0, 1.0]
    small = restore_aligned(np.stack([cv2.resize(crops[0], (128, 128))]), identity_restorer)
    assert small.shape == (1, 3, 512, 512)
    with pytest.raises(FaceInputError, match="not square"):
        restore_aligned([crops[0][:400]], identity_restorer)
    with pytest.raises(FaceInputError, match="2 entries for 3 aligned faces"):
        restore_aligned(crops, identity_restorer, identity_index=[0, 0])
