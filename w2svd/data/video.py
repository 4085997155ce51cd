"""Video and image bytes ↔ uint8 arrays with PyAV and OpenCV, and why a file cannot be used.

Decoding failures raise ``BadInput`` with a machine-readable ``reason`` (one of
``QUARANTINE_REASONS`` in ``w2svd.data.shards``), so the pipeline can quarantine a file with an
honest label instead of guessing from an exception's text later.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction

import av
import cv2
import numpy as np


class BadInput(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Container signatures: a file that starts like a video but will not open is damaged
# ("unreadable"), while one that does not is some other kind of file ("not_a_video").
def looks_like_video_container(data: bytes) -> bool:
    head = data[:16]
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide")  # ISO BMFF: mp4, mov, m4v
        or head[:4] == b"\x1a\x45\xdf\xa3"  # EBML: mkv, webm
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
        or head[:3] == b"FLV"
        or head[:1] == b"\x47" and len(data) > 188 and data[188:189] == b"\x47"  # MPEG-TS
    )


# Formats PyAV opens as one-frame "videos" that are really still images.
_IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "gif", "tiff_pipe")


@dataclass
class VideoInfo:
    width: int
    height: int
    fps: float
    num_frames: int  # from the container header; 0 when it does not say
    duration_s: float


# libx264 output varies from run to run here (measured: identical frames gave 2-6 different
# byte streams in 15 encodes, even with threads=1), so seeded synthetic data uses FFmpeg's own
# MPEG-4 Part 2 encoder, which is byte-reproducible; both are real codecs in an mp4 container.
REPRODUCIBLE_CODEC = "mpeg4"


def encode_video(frames_THWC: np.ndarray, fps: float, *, crf: int = 18, codec: str = "libx264") -> bytes:
    """uint8 RGB frames → mp4 bytes (yuv420p, moov first so partial reads still parse)."""
    if frames_THWC.dtype != np.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames_THWC.dtype} {frames_THWC.shape}")
    _, height, width, _ = frames_THWC.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 with yuv420p needs even sizes, got {height}x{width}")
    # faststart re-reads the finished file to move the index first, which needs a real file.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        _encode_to(path, frames_THWC, fps, crf, codec)
        with open(path, "rb") as f:
            return f.read()


def _encode_to(path: str, frames_THWC: np.ndarray, fps: float, crf: int, codec: str) -> None:
    _, height, width, _ = frames_THWC.shape
    with av.open(path, mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        else:
            # Quality by quantiser: qmin = qmax = 2 is close to lossless for MPEG-4 Part 2.
            stream.bit_rate = 8_000_000
            stream.codec_context.qmin, stream.codec_context.qmax = 2, 4
        for frame in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _open(data: bytes) -> av.container.InputContainer:
    if len(data) == 0:
        raise BadInput("zero_bytes", "the file is empty")
    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as err:
        text = str(err)
        if "moov atom not found" in text:
            # An mp4 whose index was written last and never arrived: a cut-off upload.
            raise BadInput("truncated", f"container index missing ({text})") from None
        if looks_like_video_container(data):
            raise BadInput("unreadable", f"video container does not parse ({text})") from None
        raise BadInput("not_a_video", f"no known video container ({text})") from None


def _video_stream(container, data: bytes) -> av.VideoStream:
    if container.format.name in _IMAGE_FORMATS or any(
        name in _IMAGE_FORMATS for name in container.format.name.split(",")
    ):
        raise BadInput("not_a_video", f"a still image ({container.format.name})")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        if not container.streams.audio and looks_like_video_container(data):
            # A video container whose track list is gone or garbled: damaged, not another kind of file.
            raise BadInput("unreadable", f"video container without usable tracks (has {', '.join(kinds)})")
        raise BadInput("not_a_video", f"no video stream (has {', '.join(kinds)})")
    return container.streams.video[0]


def _info(container, stream) -> VideoInfo:
    fps = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000
    num_frames = stream.frames or (round(duration * fps) if fps and duration else 0)
    return VideoInfo(stream.codec_context.width, stream.codec_context.height, fps, int(num_frames), duration)


def probe_video(data: bytes) -> VideoInfo:
    with _open(data) as container:
        return _info(container, _video_stream(container, data))


def decode_video(data: bytes, frame_indices: list[int] | None = None, *, check_complete: bool = True,
                 threads: int = 0) -> tuple[np.ndarray, VideoInfo]:
    """Video bytes → uint8 RGB ``[T, H, W, 3]`` (all frames, or those at ``frame_indices``).

    With ``check_complete`` the rest of the stream is decoded too (without converting frames),
    so a file cut short or corrupted after the wanted frames is still caught: ``truncated``
    when packets are missing, ``unreadable`` when they are all there but do not decode.
    ``threads``: FFmpeg decoding threads (0: one per core of the machine, FFmpeg's default).
    """
    with _open(data) as container:
        stream = _video_stream(container, data)
        info = _info(container, stream)
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        wanted = None if frame_indices is None else set(frame_indices)
        last = None if wanted is None else max(wanted)
        frames: dict[int, np.ndarray] = {}
        index = -1
        try:
            for index, frame in enumerate(container.decode(stream)):
                if wanted is None or index in wanted:
                    frames[index] = frame.to_ndarray(format="rgb24")
                if not check_complete and last is not None and index >= last:
                    break
        except av.error.FFmpegError as err:
            raise _damage(data, info, f"decoding failed after frame {index} ({err})") from None
    decoded = index + 1
    if check_complete and info.num_frames and decoded < info.num_frames:
        raise _damage(data, info, f"header promises {info.num_frames} frames, only {decoded} decode")
    if wanted is not None and len(frames) < len(wanted):
        raise _damage(data, info, f"wanted frame {last}, the stream ends after {decoded} frames")
    if not frames:
        raise BadInput("unreadable", "the video stream holds no decodable frame")
    order = frame_indices if frame_indices is not None else sorted(frames)
    return np.stack([frames[i] for i in order]), info


def _demuxed_packets(data: bytes) -> int:
    with av.open(io.BytesIO(data), mode="r") as container:
        count = 0
        try:
            for packet in container.demux(container.streams.video[0]):
                count += packet.size > 0
        except av.error.FFmpegError:
            pass
        return count


def _damage(data: bytes, info: VideoInfo, detail: str) -> BadInput:
    packets = _demuxed_packets(data)
    if info.num_frames and packets < info.num_frames:
        return BadInput("truncated", f"{detail}; {packets} of {info.num_frames} packets present")
    return BadInput("unreadable", f"{detail}; all packets present, the data is corrupt")


def count_decodable_frames(data: bytes) -> int:
    """Frames that really decode, for files whose header does not state a count."""
    with _open(data) as container:
        stream = _video_stream(container, data)
        n = 0
        try:
            for _ in container.decode(stream):
                n += 1
        except av.error.FFmpegError:
            pass
        return n


def encode_png(image_HWC: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image_HWC, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG/... bytes → uint8 RGB ``[H, W, 3]``."""
    if not data:
        raise BadInput("bad_reference", "the reference image is empty")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise BadInput("bad_reference", "the reference image does not decode")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
