"""Decode a video segment with PyAV into JPEG frames at a fixed rate and short side.

Frames are resampled to `fps` by sample-and-hold (each output time takes the latest decoded frame
at or before it), resized with swscale's area filter so that the short side is `short_side`, and
encoded as JPEG. Storing JPEG frames, not the video, means a training clip later decodes only the
frames it samples (the DMVR layout).

Every failure becomes a `VideoRejected` with a precise reason; nothing else escapes.
"""

from __future__ import annotations

import dataclasses
import io
import math

import av
import numpy as np
from PIL import Image

from sfa_vivit.core.storage import open_url

# How far the decoded content may fall short of the requested end before we call the video short
# or truncated: two source frames, or 0.25 s, whichever is larger.
_SLACK_S = 0.25
# Kinetics clip files are nominally end-start long but are often a few frames shorter.
TRIM_TOLERANCE_S = 0.5

# Leading bytes of the containers we meet: a file that starts like a video but will not open is
# truncated or corrupt; one that does not is not a video at all.
_CONTAINER_MAGIC = {b"ftyp": 4, b"\x1a\x45\xdf\xa3": 0, b"RIFF": 0, b"\x00\x00\x01\xba": 0, b"OggS": 0}


class VideoRejected(Exception):
    """This video cannot become a sample; `reason` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class DecodedClip:
    frames: list[bytes]           # JPEG bytes, one per output frame
    fps: float
    height: int
    width: int
    source_fps: float
    source_duration: float | None


def _looks_like_video(head: bytes) -> bool:
    return any(head[off:off + len(magic)] == magic for magic, off in _CONTAINER_MAGIC.items())


def decode_segment(url: str, *, start: float | None, end: float | None, trimmed: bool | None, fps: float,
                   short_side: int, jpeg_quality: int = 90, size: int | None = None) -> DecodedClip:
    """Decode [start, end) of the video at `url` (local path or fsspec URL) to JPEG frames.

    start/end: seconds, None for the whole file. trimmed: True if the file holds exactly the
    segment (decode all of it), False if the segment is cut from a longer video, None to decide from
    the file's duration. size: the file size when already known (saves a stat).
    Raises VideoRejected with a reason for missing, empty, non-video, truncated or too-short input.
    """
    try:
        f = open_url(url, "rb")
    except FileNotFoundError:
        raise VideoRejected("missing: file not found") from None
    with f:
        head = f.read(16)
        if not head:
            raise VideoRejected("empty file (0 bytes)")
        f.seek(0)
        try:
            container = av.open(f, mode="r", metadata_errors="ignore")
        except av.error.FFmpegError as e:
            if _looks_like_video(head):
                raise VideoRejected(f"truncated or corrupt video: the container cannot be opened ({_msg(e)})") from None
            raise VideoRejected(f"not a video: no known container format ({_msg(e)})") from None
        with container:
            if not container.streams.video:
                raise VideoRejected("not a video: the file has no video stream")
            return _decode(container, start, end, trimmed, fps, short_side, jpeg_quality)


def _decode(container, start, end, trimmed, fps, short_side, jpeg_quality) -> DecodedClip:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    source_fps = float(stream.average_rate or stream.guessed_rate or 25)
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000

    # Which part of the file is the segment?
    # The whole file (no segment, or a clip file): decode to the end of the stream, whatever the
    # container declares (variable-frame-rate files often declare less or more than they hold).
    if start is None or end is None:
        seg_start, seg_end = 0.0, None
    elif trimmed is True or (trimmed is None and duration is not None and duration < end - TRIM_TOLERANCE_S):
        # A clip file: the segment is the whole file, nominally end - start long.
        if duration is not None and duration + TRIM_TOLERANCE_S < end - start:
            raise VideoRejected(f"video is {duration:.2f} s long, shorter than the annotated segment "
                                f"({end - start:.2f} s, {start:g}-{end:g} s)")
        seg_start, seg_end = 0.0, None
    else:
        if duration is not None and duration + _SLACK_S < end:
            raise VideoRejected(f"video is {duration:.2f} s long, shorter than the annotated segment "
                                f"{start:.2f}-{end:.2f} s")
        seg_start, seg_end = start, end

    if seg_start > 1.0:
        # Long untrimmed videos (EPIC): jump to the keyframe before the segment.
        container.seek(int(seg_start / stream.time_base), stream=stream, backward=True, any_frame=False)

    targets = None if seg_end is None else _targets(seg_start, seg_end, fps)
    frames: list[bytes] = []
    last_jpeg = None
    last_time = None
    last_duration = 1 / source_fps     # how long the last decoded frame is shown (variable frame rate: varies)
    reached = 0.0                       # the time of the latest frame decoded, used or not
    decoded = 0
    k = 0
    height = width = 0
    try:
        for frame in container.decode(stream):
            t = frame.time
            if t is None:
                continue
            decoded += 1
            reached = max(reached, t)
            if targets is None:  # unknown duration: take frames as they come
                targets = _targets(seg_start, math.inf, fps)
            # Every target before this frame's time is served by the previous frame.
            while k < len(targets) and targets[k] < t - 1e-6:
                if last_jpeg is None:
                    if t - targets[k] > 2 / source_fps + _SLACK_S:
                        raise VideoRejected(f"truncated or corrupt video: the first decodable frame is at "
                                            f"{t:.2f} s, the segment starts at {targets[k]:.2f} s")
                    last_jpeg, height, width = _encode(frame, short_side, jpeg_quality)
                frames.append(last_jpeg)
                k += 1
            if k >= len(targets):
                break
            last_jpeg, height, width = _encode(frame, short_side, jpeg_quality)
            last_time = t
            if frame.duration and frame.time_base is not None:
                last_duration = max(1 / source_fps, float(frame.duration * frame.time_base))
    except av.error.FFmpegError as e:
        raise VideoRejected(f"truncated or corrupt video: decoding failed after {len(frames)} frames "
                            f"({_msg(e)})") from None

    if last_jpeg is None:
        raise VideoRejected("truncated or corrupt video: no frame could be decoded")
    if decoded < 2 and (seg_end is None or seg_end - seg_start > 2 / fps):
        raise VideoRejected("a single decodable frame: a still image, not a video")
    decoded_to = max(last_time + last_duration, reached)
    # A segment must be there whole; a whole file at least as long as it declares (within the slack).
    wanted_end = seg_end if seg_end is not None else (duration or 0.0)
    if decoded_to + max(2 / source_fps, _SLACK_S) < wanted_end:
        declared = f"{duration:.2f} s declared" if duration is not None else "duration unknown"
        raise VideoRejected(f"truncated video: decoding stopped at {decoded_to:.2f} s of {wanted_end:.2f} s "
                            f"({declared})")
    # Targets past the last frame but within the slack (or the declared length): hold the last frame.
    fill_end = wanted_end if seg_end is not None else max(decoded_to, wanted_end)
    while len(frames) < len(targets) and targets[len(frames)] < fill_end - 1e-6:
        frames.append(last_jpeg)
    return DecodedClip(frames, fps, height, width, source_fps, duration)


def _targets(start: float, end: float, fps: float) -> list[float]:
    if math.isinf(end):
        return [start + i / fps for i in range(100_000)]
    n = max(1, int(math.floor((end - start) * fps + 1e-6)))
    return [start + i / fps for i in range(n)]


def _encode(frame: av.VideoFrame, short_side: int, quality: int) -> tuple[bytes, int, int]:
    """The frame as displayed (its container's rotation applied: phone videos are stored sideways with a
    display matrix), resized to `short_side`, as JPEG; returns (bytes, height, width)."""
    w, h = frame.width, frame.height
    scale = short_side / min(w, h)
    # Even sizes keep chroma subsampling exact; at least 2 px.
    nw, nh = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
    rgb = frame.reformat(width=nw, height=nh, format="rgb24", interpolation="AREA")
    turns = round((_rotation(frame) % 360) / 90) % 4     # counter-clockwise quarter turns
    if turns:
        pixels = np.ascontiguousarray(np.rot90(rgb.to_ndarray(), k=turns))
        image = Image.fromarray(pixels)
    else:
        image = rgb.to_image()
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), image.height, image.width


def _rotation(frame: av.VideoFrame) -> float:
    try:
        return float(frame.rotation or 0)
    except (AttributeError, ValueError):
        return 0.0


def _msg(e: Exception) -> str:
    return (getattr(e, "strerror", None) or str(e) or type(e).__name__).strip()
