"""Archive building blocks without models: inputs and their output tree, the manifest, face tracking, video I/O."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from ridfr_core.archive.inputs import collect_inputs, is_archive_input
from ridfr_core.archive.manifest import (append_record, finished_inputs, latest_records, manifest_path, merge_parts,
                                         part_path, read_records)
from ridfr_core.archive.tracking import box_iou, track_faces, vote_identities
from ridfr_core.archive.video import VideoSource, write_video

av = pytest.importorskip("av")


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_glob_and_list_inputs_mirror_their_tree(tmp_path):
    albums = tmp_path / "albums"
    for name in ("1990/a.jpg", "1990/b.png", "2001/trip/c.jpg", "notes.txt", ".hidden/d.jpg"):
        touch(albums / name)
    out = albums / "restored"  # an output folder inside the input folder is never an input
    touch(out / "1990" / "a.jpg")
    assert [i.relative for i in collect_inputs(str(albums), exclude=out)] == [
        "1990/a.jpg", "1990/b.png", "2001/trip/c.jpg", "notes.txt"]
    assert [i.kind for i in collect_inputs(str(albums), exclude=out)] == ["image", "image", "image", "other"]
    assert [i.relative for i in collect_inputs(str(albums / "*" / "*.jpg"))] == ["1990/a.jpg"]
    globbed = collect_inputs(str(albums / "**" / "*.jpg"))
    assert [i.relative for i in globbed] == ["1990/a.jpg", "2001/trip/c.jpg", "restored/1990/a.jpg"]
    listing = touch(tmp_path / "list.txt", b"albums/1990/b.png\n# a comment\n\nalbums/2001/trip/c.jpg  # last\n")
    listed = collect_inputs(str(listing))
    assert [i.relative for i in listed] == ["1990/b.png", "2001/trip/c.jpg"]
    assert listed[0].source == albums / "1990" / "b.png"
    assert is_archive_input(str(albums)) and is_archive_input(str(listing)) and is_archive_input("x/*.jpg")
    assert is_archive_input("talk.mp4") and not is_archive_input(str(albums / "1990" / "a.jpg"))
    with pytest.raises(ValueError, match="--lq"):
        collect_inputs(str(tmp_path / "missing"))


def test_manifest_resume_merge_and_torn_lines(tmp_path):
    out = tmp_path / "out"
    touch(out / "a.png")
    append_record(manifest_path(out), {"input": "a.png", "status": "done", "output": "a.png"})
    append_record(manifest_path(out), {"input": "b.png", "status": "done", "output": "b.png"})  # output gone
    append_record(manifest_path(out), {"input": "c.png", "status": "error", "output": None})
    append_record(part_path(out, 1), {"input": "c.png", "status": "skipped", "output": None})
    with open(manifest_path(out), "a") as stream:
        stream.write('{"input": "d.png", "sta')  # a crash in the middle of a line
    assert finished_inputs(out) == {"a.png"}
    assert merge_parts(out) == 1
    assert not part_path(out, 1).exists()
    assert finished_inputs(out) == {"a.png", "c.png"}
    assert latest_records(manifest_path(out))["c.png"]["status"] == "skipped"
    append_record(part_path(out, 1), {"input": "e.png", "status": "done", "output": None})
    assert set(latest_records(part_path(out, 1))) == {"e.png"}  # the torn line did not swallow it
    assert [record["input"] for record in read_records(manifest_path(out))] == ["a.png", "b.png", "c.png", "c.png"]


def test_tracks_follow_overlapping_boxes_through_gaps_and_crossings():
    left, right = np.array([0, 0, 100, 100.0]), np.array([300, 0, 400, 100.0])
    assert box_iou(left[None], left[None])[0, 0] == pytest.approx(1.0)
    assert box_iou(left[None], right[None])[0, 0] == 0.0
    frames = [np.stack([left, right]), np.stack([right + [10, 0, 10, 0], left + [10, 5, 10, 5]]),  # order swapped
              np.zeros((0, 4)), np.stack([left + [20, 5, 20, 5]]),  # a gap of one frame, then only the left face
              np.stack([np.array([150, 300, 250, 400.0])])]  # somebody new
    assert track_faces(frames) == [[0, 1], [1, 0], [], [0], [2]]
    assert track_faces(frames, max_gap=0) == [[0, 1], [1, 0], [], [2], [3]]


def test_a_track_gets_one_identity_by_vote():
    tracks = [0, 1, 0, 1, 0, 1]
    identities = [0, 1, 1, 1, 0, None]  # track 0 flickers once to person 1; track 1 misses once
    similarity = np.array([[0.6, 0.1], [0.1, 0.5], [0.3, 0.35], [0.0, 0.4], [0.5, 0.2], [0.1, 0.15]])
    votes = vote_identities(tracks, identities, similarity)
    assert (votes[0].identity, votes[1].identity) == (0, 1)
    assert votes[0].votes == pytest.approx(2 / 3) and votes[0].frames == 3
    assert votes[0].similarity == pytest.approx((0.6 + 0.3 + 0.5) / 3)
    tied = vote_identities([0, 0], [0, 1], np.array([[0.3, 0.5], [0.3, 0.5]]))
    assert tied[0].identity == 1  # a tie goes to the higher mean similarity


def make_video(path, frames, rate=10, audio_seconds=None, rotation=0, codec="libx264", video=True):
    """A small H.264 video (and AAC audio) written with PyAV; ``rotation``: display rotation as a phone records it
    (``frames`` are then the stored, sideways frames)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = None
        if video:
            stream = container.add_stream(codec, rate=rate)
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            stream.options = {"qp": "0"} if codec == "libx264" else {}  # lossless: a black frame decodes black
            if rotation:
                stream.set_display_rotation(rotation)
        audio = None
        if audio_seconds:
            audio = container.add_stream("aac", rate=16000)
            audio.layout = "mono"
        for rgb in frames if video else ():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        if stream is not None:
            container.mux(stream.encode(None))
        if audio is not None:
            samples = np.sin(np.arange(int(16000 * audio_seconds)) / 16000 * 2 * np.pi * 440).astype(np.float32)
            for start in range(0, len(samples), 1024):
                chunk = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, start
                container.mux(audio.encode(chunk))
            container.mux(audio.encode(None))
    return path


def audio_packets(path):
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return stream.codec_context.name, [p.size for p in container.demux(stream) if p.dts is not None]


def test_video_keeps_rate_timestamps_and_audio(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(7)]
    source = make_video(tmp_path / "talk.mp4", frames, rate=Fraction(30000, 1001), audio_seconds=0.7)
    opened, open_video = [], av.open
    monkeypatch.setattr(av, "open", lambda path, *args, **kwargs: opened.append(path) or open_video(path, *args,
                                                                                                    **kwargs))
    target = tmp_path / "out.mp4"
    with VideoSource(source) as video:
        decoded = list(video.frames())
        again = list(video.frames())  # the restoring pass reads the same frames again
        assert write_video(video, target, (255 - rgb for rgb, _ in again)) == 7
    assert opened == [str(source), str(target)]  # the input once (it was four times), the output once
    assert [pts for _, pts in again] == [pts for _, pts in decoded]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(decoded, again))
    monkeypatch.undo()
    with av.open(str(target)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(30000, 1001)
        out = [(frame.to_ndarray(format="rgb24"), frame.time) for frame in container.decode(stream)]
    with av.open(str(source)) as container:
        times = [frame.time for frame in container.decode(video=0)]
    assert [time for _, time in out] == pytest.approx(times, abs=1e-3)
    assert np.abs(out[3][0].astype(int) - (255 - decoded[3][0]).astype(int)).mean() < 20  # lossy, but these frames
    assert audio_packets(target) == audio_packets(source)  # copied packet for packet, not re-encoded


def test_a_phone_video_is_restored_upright_and_keeps_its_rotation(tmp_path):
    """Phones store portrait video sideways with a display rotation: faces are found upright, the output
    keeps the rotation (it came out sideways before)."""
    upright = np.zeros((96, 64, 3), np.uint8)
    upright[:48] = 255  # the top half white, as a face is upright
    stored = np.ascontiguousarray(np.rot90(upright, -1))  # what the phone stores for a display rotation of 90
    source = make_video(tmp_path / "portrait.mp4", [stored] * 3, rotation=90)
    target = tmp_path / "out.mp4"
    with VideoSource(source) as video:
        frames = [rgb for rgb, _ in video.frames()]
        assert video.rotation == 90 and frames[0].shape == (96, 64, 3)
        assert frames[0][:40].mean() > 250 and frames[0][56:].mean() < 5  # upright
        write_video(video, target, (rgb for rgb, _ in video.frames()))
    with av.open(str(target)) as container:
        frame = next(container.decode(video=0))
        assert frame.rotation == 90 and (frame.height, frame.width) == (64, 96)  # stored as the source is
        assert np.abs(frame.to_ndarray(format="rgb24").astype(int) - stored).mean() < 3


def test_an_avi_of_odd_size_is_written_and_an_audio_file_is_named(tmp_path):
    """mpeg4 (for .avi) has no yuv444p, the fallback for odd sides: it takes 4:2:0 at odd sides instead."""
    frames = [np.full((47, 65, 3), value, np.uint8) for value in (40, 200)]
    source = make_video(tmp_path / "odd.avi", frames, codec="mpeg4")
    target = tmp_path / "out.avi"
    with VideoSource(source) as video:
        assert write_video(video, target, (rgb for rgb, _ in video.frames())) == 2
    with av.open(str(target)) as container:
        restored = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert [frame.shape for frame in restored] == [(47, 65, 3)] * 2 and abs(restored[1].mean() - 200) < 8
    sound = make_video(tmp_path / "voice.m4a.mp4", None, audio_seconds=0.3, video=False)
    with pytest.raises(ValueError, match=r"voice.m4a.mp4: has no video stream \(only audio streams\)"):
        VideoSource(sound)


def test_a_glob_visits_each_real_file_once_through_a_link_loop(tmp_path):
    """A folder link back to its parent: 3 photos stay 3 inputs (glob.glob followed the loop 40 levels deep)."""
    arc = tmp_path / "arc"
    for name in ("a.jpg", "sub/b.jpg", "sub/deeper/c.jpg"):
        touch(arc / name)
    (arc / "sub" / "deeper" / "back").symlink_to(arc, target_is_directory=True)
    (arc / "dead.jpg").symlink_to(tmp_path / "gone.jpg")  # a broken link still gets its manifest line
    (arc / "selfloop.jpg").symlink_to("selfloop.jpg")  # so does a link to itself (it was a RuntimeError traceback)
    (arc / "sub" / "ping.jpg").symlink_to("pong.jpg")
    (arc / "sub" / "pong.jpg").symlink_to("ping.jpg")
    expected = ["a.jpg", "dead.jpg", "selfloop.jpg", "sub/b.jpg", "sub/deeper/c.jpg", "sub/ping.jpg", "sub/pong.jpg"]
    assert [i.relative for i in collect_inputs(str(arc / "**" / "*.jpg"), exclude=tmp_path / "out")] == expected
    assert [i.relative for i in collect_inputs(str(arc), exclude=tmp_path / "out")] == expected
    assert [i.relative for i in collect_inputs(str(arc / "sub" / "**"))] == ["b.jpg", "deeper/c.jpg", "ping.jpg",
                                                                          "pong.jpg"]
    # One level of wildcard through the link finds each real file once too, under its shortest name.
    assert [i.relative for i in collect_inputs(str(arc / "sub" / "deeper" / "*" / "*.jpg"))] == [
        "back/a.jpg", "back/dead.jpg", "back/selfloop.jpg"]


def test_inputs_that_are_all_broken_or_looping_links_are_refused(tmp_path):
    """Nothing to restore: one line before any model loads, naming the entries."""
    arc = tmp_path / "arc"
    arc.mkdir()
    (arc / "selfloop.jpg").symlink_to("selfloop.jpg")
    (arc / "dead.png").symlink_to(tmp_path / "gone.png")
    for lq in (str(arc), str(arc / "*.jpg")):
        with pytest.raises(ValueError, match=r"--lq: .*: none of its \d entries can be opened \((dead.png, )?"
                                             r"selfloop.jpg: missing files, broken links or links that loop\)"):
            collect_inputs(lq, exclude=tmp_path / "out")


def test_a_list_file_that_is_not_utf8_names_the_option_and_the_file(tmp_path):
    listing = touch(tmp_path / "list.txt", "photos/é.jpg\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"--lq .*list.txt: the list file is not UTF-8 text"):
        collect_inputs(str(listing))
    touch(tmp_path / "photos" / "a.jpg")
    listing.write_bytes("\ufeffphotos/a.jpg\r\n".encode("utf-8"))  # Notepad's BOM and line ends
    assert [i.source for i in collect_inputs(str(listing))] == [tmp_path / "photos" / "a.jpg"]
