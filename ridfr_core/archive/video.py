"""Videos in and out with PyAV: frames as upright HWC uint8 RGB, the output keeps the frame rate, the frame
timestamps, the rotation a phone recorded and the audio (whose packets are copied, not re-encoded)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
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


def quarter_turns(rotation: float) -> int:
    """A display rotation (degrees counter-clockwise, as PyAV reads it) in quarter turns."""
    return round(rotation / 90) % 4


class VideoSource:
    """One input video, opened once and decoded twice (faces are found in every frame before any is
    restored): the second pass starts from a seek to the start, and the audio packets are kept from the
    first pass for the output. Frames come upright (a phone's rotation applied)."""

    def __init__(self, path: Path):
        av = import_av()
        self.path = Path(path)
        self.container = av.open(str(path))
        if not self.container.streams.video:
            kinds = sorted({stream.type for stream in self.container.streams}) or ["no"]
            self.container.close()
            raise ValueError(f"{path}: has no video stream (only {' and '.join(kinds)} streams); give a video file, "
                             "or leave this one out of --lq.")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.audio_streams = list(self.container.streams.audio)
        self.audio_packets: list = []
        self.pts: list[int | None] | None = None  # each frame's timestamp, known after the first pass
        self.rotation = 0

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc) -> None:
        self.container.close()

    @property
    def rate(self) -> Fraction:
        return Fraction(self.stream.average_rate or self.stream.guessed_rate or Fraction(25))

    @property
    def time_base(self) -> Fraction:
        return Fraction(self.stream.time_base or Fraction(1, 90000))

    def frames(self) -> Iterator[tuple[np.ndarray, int | None]]:
        """(upright RGB frame, its pts) for every frame; a later pass gives the frames of the first one."""
        first = self.pts is None
        if first:
            self.pts, streams = [], [self.stream, *self.audio_streams]
        else:
            self.container.seek(0)
            streams = [self.stream]
        number = 0
        for packet in self.container.demux(*streams):
            if packet.stream.type == "audio":
                if packet.dts is not None:  # not the demuxer's end-of-stream flush packet
                    self.audio_packets.append(packet)
                continue
            for frame in packet.decode():
                if first:
                    self.pts.append(frame.pts)
                    self.rotation = frame.rotation if number == 0 else self.rotation
                elif number >= len(self.pts) or frame.pts != self.pts[number]:
                    raise ValueError(f"{self.path}: the frames read the second time differ from the first time "
                                     f"(frame {number}); remux the video (e.g. ffmpeg -i IN -c copy OUT) and try again.")
                number += 1
                rgb = frame.to_ndarray(format="rgb24")
                yield np.ascontiguousarray(np.rot90(rgb, quarter_turns(self.rotation))), frame.pts


def pixel_format(codec: str, width: int, height: int) -> str:
    """4:2:0 where the sides are even; else 4:4:4 where the encoder has it (x264 refuses odd 4:2:0 sides;
    mpeg4, for .avi, has only 4:2:0 and takes odd sides)."""
    av = import_av()
    formats = {fmt.name for fmt in av.codec.Codec(codec, "w").video_formats or ()}
    return "yuv420p" if (width % 2 == 0 and height % 2 == 0) or "yuv444p" not in formats else "yuv444p"


def write_video(source: VideoSource, target: Path, frames: Iterable[np.ndarray]) -> int:
    """Encode ``frames`` (one upright frame per input frame, in order) to ``target`` at the source's frame
    rate, timestamps and display rotation, with its audio packets copied in, interleaved by time; the size is
    that of the frames (upscaled ones too). Returns the frame count."""
    av = import_av()
    turns = quarter_turns(source.rotation)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{source.path}: the video has no frames.")
    written = 0
    with av.open(str(target), "w") as out:
        codec = VIDEO_CODECS.get(target.suffix.lower(), DEFAULT_VIDEO_CODEC)
        stream = out.add_stream(codec, rate=source.rate)
        height, width = np.rot90(first, -turns).shape[:2]  # stored as the source is, turned on display
        stream.width, stream.height = width, height
        stream.pix_fmt = pixel_format(codec, width, height)
        stream.time_base = source.time_base
        if turns:
            stream.set_display_rotation(source.rotation)
        audio = {audio_in.index: out.add_stream_from_template(audio_in) for audio_in in source.audio_streams}
        packets = iter(source.audio_packets)
        pending = next(packets, None)
        for rgb, pts in zip(itertools.chain([first], frames), source.pts):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(rgb, -turns)), format="rgb24")
            frame.pts, frame.time_base = pts, source.time_base
            now = float(pts * source.time_base) if pts is not None else float("inf")
            while pending is not None and packet_time(pending) <= now:
                mux_audio(out, pending, audio)
                pending = next(packets, None)
            out.mux(stream.encode(frame))
            written += 1
        out.mux(stream.encode(None))
        while pending is not None:
            mux_audio(out, pending, audio)
            pending = next(packets, None)
    return written


def packet_time(packet) -> float:
    return float(packet.pts * packet.time_base) if packet.pts is not None else float("-inf")


def mux_audio(out, packet, audio_streams: dict) -> None:
    packet.stream = audio_streams[packet.stream.index]
    out.mux(packet)
