"""Videos in and out with PyAV: frames as HWC uint8 RGB, the output keeps the frame rate, the frame
timestamps and the audio (whose packets are copied, not re-encoded)."""

from __future__ import annotations

import itertools

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

# Encoders by container; H.264 wherever the container takes it (PyAV's wheels ship libx264).
VIDEO_CODECS = {".webm": "libvpx-vp9", ".avi": "mpeg4"}
DEFAULT_VIDEO_CODEC = "libx264"


def import_av():
    try:
        import av
    except ImportError as error:
        raise ValueError("video input needs PyAV: pip install av") from error
    return av


@dataclass(frozen=True)
class VideoFrames:
    """What the decoding pass learnt: frame rate, time base and each frame's timestamp, and the size."""

    rate: Fraction
    time_base: Fraction
    pts: list[int]
    audio_streams: int


def decode_frames(path: Path) -> Iterator[tuple[np.ndarray, int | None]]:
    """(RGB frame, its pts) for every frame of the first video stream."""
    av = import_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24"), frame.pts


def probe(path: Path, pts: list[int]) -> VideoFrames:
    av = import_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        return VideoFrames(Fraction(rate), Fraction(stream.time_base or Fraction(1, 90000)), pts,
                           len(container.streams.audio))


def write_video(source: Path, target: Path, info: VideoFrames, frames: Iterable[np.ndarray]) -> int:
    """Encode ``frames`` (one per input frame, in order) to ``target`` at the input's frame rate and
    timestamps, with the audio packets of ``source`` copied in, interleaved by time; the size is that of the
    frames (upscaled ones too). Returns the frame count."""
    av = import_av()
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{source}: the video has no frames.")
    written = 0
    with av.open(str(source)) as audio_in, av.open(str(target), "w") as out:
        stream = out.add_stream(VIDEO_CODECS.get(target.suffix.lower(), DEFAULT_VIDEO_CODEC), rate=info.rate)
        height, width = first.shape[:2]
        stream.width, stream.height = width, height
        even = width % 2 == 0 and height % 2 == 0
        stream.pix_fmt = "yuv420p" if even else "yuv444p"  # 4:2:0 needs even sides
        stream.time_base = info.time_base
        audio_streams = {source_stream.index: out.add_stream_from_template(source_stream)
                         for source_stream in audio_in.streams.audio}
        packets = audio_in.demux(*audio_in.streams.audio) if audio_streams else iter(())
        pending = next(packets, None)
        for rgb, pts in zip(itertools.chain([first], frames), info.pts):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = pts, info.time_base
            now = float(pts * info.time_base) if pts is not None else float("inf")
            while pending is not None and packet_time(pending) <= now:
                mux_audio(out, pending, audio_streams)
                pending = next(packets, None)
            out.mux(stream.encode(frame))
            written += 1
        out.mux(stream.encode(None))
        while pending is not None:
            mux_audio(out, pending, audio_streams)
            pending = next(packets, None)
    return written


def packet_time(packet) -> float:
    return float(packet.pts * packet.time_base) if packet.pts is not None else float("-inf")


def mux_audio(out, packet, audio_streams: dict) -> None:
    if packet.dts is None:  # the demuxer's end-of-stream flush packet
        return
    packet.stream = audio_streams[packet.stream.index]
    out.mux(packet)
