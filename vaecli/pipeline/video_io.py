"""Reading frames from videos, GIFs and images, and writing them to videos or PNG sequences.

Frames are uint8 numpy arrays `(H, W, 3)` RGB, produced one at a time: a video is decoded with PyAV only as
far as its frames are asked for, so memory does not grow with its length. Rotation metadata is applied.
"""

from __future__ import annotations

import contextlib
import glob
import os
import struct
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from vaecli.errors import InputError, OutputError, UsageError, printable
from vaecli.ops.files import write_error
from vaecli.ops.validate import DEFAULT_MAX_PIXELS, pixels, regular_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_IMAGE_FPS = Fraction(24)
FORMATS = ("mp4", "webm", "gif", "png")


def _rgb(image: np.ndarray, where: str = "image") -> np.ndarray:
    """Any imageio array (H, W), (H, W, 1|3|4) -> uint8 (H, W, 3); other layouts are refused with one line."""
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)) or image.dtype == bool:
        raise InputError(f"{where}: decoded to an array of shape {list(image.shape)}, not one picture of 1-4 "
                         "channels; convert it to PNG frames or a video")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype != np.uint8:
        image = (image.astype(np.float64) / np.iinfo(image.dtype).max * 255).round().astype(np.uint8) \
            if np.issubdtype(image.dtype, np.integer) else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    if image.shape[2] <= 2:  # gray, gray + alpha
        image = np.repeat(image[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def image_frames(name: str) -> int:
    """How many frames an image file holds (multi-page TIFF, animated PNG or WebP: more than 1), from its header."""
    from PIL import Image

    with pillow_limits(printable(name)), Image.open(name) as image:
        return int(getattr(image, "n_frames", 1) or 1)


@dataclass(frozen=True)
class Selection:
    """Which frames to take: from `start`, every `stride`-th, at most `count` (None = to the end)."""

    start: int = 0
    count: int | None = None
    stride: int = 1

    def __post_init__(self):
        if self.start < 0 or self.stride < 1 or (self.count is not None and self.count < 1):
            raise UsageError("--start must be >= 0, --stride >= 1 and --frames >= 1")

    def wants(self, index: int) -> bool:
        return index >= self.start and (index - self.start) % self.stride == 0

    def done(self, taken: int) -> bool:
        return self.count is not None and taken >= self.count


# Containers FFmpeg may open for a video input (format_whitelist): no playlists (hls), concat lists, image-pattern
# sequences or network formats, which would make FFmpeg open other files or URLs named inside the input.
DEMUXERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "flv", "mpegts", "mpeg", "ogg", "asf", "gif", "h264",
            "hevc", "m4v", "mjpeg", "nut", "yuv4mpegpipe", "dv", "mxf", "ivf", "obu", "apng", "flic",
            "wav", "mp3", "flac", "aac")  # audio-only: opened to say "no video stream"
OPEN_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": ",".join(DEMUXERS)}
# What third-party decoders (Pillow through imageio, PyAV) raise on corrupt or hostile data
DECODER_ERRORS = (OSError, ValueError, SyntaxError, IndexError, KeyError, AttributeError, TypeError, EOFError,
                  RuntimeError, MemoryError, struct.error, av.error.FFmpegError)


@contextlib.contextmanager
def pillow_limits(where: str) -> Iterator[None]:
    """Pillow's own decompression-bomb guard: its warning is silenced (vaecli checks `--max-pixels` itself) and its
    error (images over ~179 MP, whatever --max-pixels says) becomes the usual one-line error."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except Image.DecompressionBombError:
            raise InputError(f"{where}: an image of more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, which Pillow "
                             "refuses to decode (a decompression bomb?)") from None


def image_size(name: str) -> tuple[int, int]:
    """(W, H) of an image or GIF from its header, without decoding it."""
    from PIL import Image

    with pillow_limits(printable(name)), Image.open(name) as image:
        return image.size


class FrameSource:
    """Frames of one input: a video file, a GIF, an image, an image folder or a glob pattern.

    Only regular files are opened; frames larger than `max_pixels` are refused before they are decoded."""

    def __init__(self, spec: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.spec = str(spec)
        self.max_pixels = max_pixels
        path = Path(self.spec)
        if any(ch in self.spec for ch in "*?[") and not path.exists():
            self.kind, self.images = "images", sorted(p for p in glob.glob(self.spec) if p.lower().endswith(IMAGE_SUFFIXES))
            if not self.images:
                raise InputError(f"{self.spec}: the pattern matches no images")
        elif path.is_dir():
            self.kind = "images"
            self.images = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.images:
                raise InputError(f"{path}: a folder with no images ({', '.join(IMAGE_SUFFIXES)})")
        else:
            regular_file(path)  # a FIFO or device would block the reader forever
            if path.suffix.lower() == ".gif":
                self.kind, self.images = "gif", [str(path)]
            elif path.suffix.lower() in IMAGE_SUFFIXES:  # an animated one (APNG, multi-page TIFF) is a clip
                self.kind, self.images = "image", [str(path)]
                if self._frames_in(str(path)) > 1:
                    self.kind = "gif"
            else:
                self.kind, self.images = "video", []
        self.name = path.name if self.kind != "images" or path.is_dir() else Path(self.images[0]).parent.name
        self.fps, self.count, self.codec = self._probe()

    def _animated(self) -> str:
        return "GIF" if self.images[0].lower().endswith(".gif") else "animated image"

    def _frames_in(self, name: str) -> int:
        try:
            return image_frames(name)
        except DECODER_ERRORS as e:
            raise InputError(f"{printable(name)}: unreadable image ({printable(e)})") from None

    def _probe(self) -> tuple[Fraction, int | None, str]:
        if self.kind == "images":
            return DEFAULT_IMAGE_FPS, len(self.images), "images"
        if self.kind == "image":
            return DEFAULT_IMAGE_FPS, 1, "image"
        if self.kind == "gif":
            from PIL import Image

            try:
                with pillow_limits(printable(self.spec)), Image.open(self.images[0]) as image:
                    pixels(*image.size, printable(self.spec), self.max_pixels)
                    duration = image.info.get("duration") or 0
                    count = getattr(image, "n_frames", 1)
            except DECODER_ERRORS as e:
                raise InputError(f"{printable(self.spec)}: unreadable {self._animated()} ({printable(e)})") from None
            fps = Fraction(1000, int(duration)) if isinstance(duration, (int, float)) and duration >= 1 else Fraction(10)
            return fps, count, "gif"
        with self._open() as container:
            try:
                stream = container.streams.video[0]
                codec = stream.codec_context
                if codec is None:
                    raise InputError(f"{printable(self.spec)}: a video stream in a codec FFmpeg cannot decode")
                pixels(codec.width or 1, codec.height or 1, printable(self.spec), self.max_pixels)
                fps = stream.average_rate or stream.guessed_rate or stream.base_rate or DEFAULT_IMAGE_FPS
                if not 0 < fps <= 10_000:
                    fps = DEFAULT_IMAGE_FPS  # a broken container's rate: play at the image default
                count = stream.frames or None
                if count is None and stream.duration and stream.time_base:
                    count = int(round(float(stream.duration * stream.time_base * fps)))
                return Fraction(fps), count if count and count > 0 else None, codec.name
            except (*DECODER_ERRORS, ZeroDivisionError, OverflowError) as e:
                raise InputError(f"{printable(self.spec)}: not a readable video ({type(e).__name__})") from None

    def _open(self):
        where = printable(self.spec)
        try:
            container = av.open(self.spec, options=OPEN_OPTIONS)
        except av.error.EOFError:
            raise InputError(f"{where}: the video has no frames (the file ends after its header)") from None
        except av.error.ArgumentError:
            raise InputError(f"{where}: not a video container vaecli opens (playlists, concat lists and image "
                             "patterns are refused; convert it to .mp4 or .mkv)") from None
        except av.error.FFmpegError as e:
            raise InputError(f"{where}: not a readable video ({printable(e.strerror or e)})") from None
        except OSError as e:
            raise InputError(f"{where}: cannot read ({e.strerror})") from None
        except DECODER_ERRORS as e:
            raise InputError(f"{where}: not a readable video ({type(e).__name__})") from None
        if not container.streams.video:
            container.close()
            raise InputError(f"{where}: has no video stream")
        return container

    def frames(self, selection: Selection = Selection()) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (source frame index, uint8 (H, W, 3)) for the selected frames, decoding only as far as needed."""
        taken = 0
        for index, frame in self._all_frames(selection):  # only frames the selection wants
            taken += 1
            yield index, frame
            if selection.done(taken):
                return
        if taken == 0:
            total = self.count if self.count is not None else "an unknown number of"
            raise InputError(f"{self.spec}: no frames selected (start {selection.start}, video has {total} frames)"
                             if selection.start else f"{self.spec}: the video has no frames")

    def _all_frames(self, selection: Selection) -> Iterator[tuple[int, np.ndarray]]:
        if self.kind in ("images", "image"):
            import imageio.v3 as iio

            for index, name in enumerate(self.images):
                if not selection.wants(index):
                    continue
                regular_file(name)
                try:
                    pixels(*image_size(name), printable(name), self.max_pixels)
                    if self.kind == "images" and self._frames_in(name) > 1:
                        raise InputError(f"{printable(name)}: an image of {image_frames(name)} frames in a sequence "
                                         "of images; give it as an input of its own (its frames are a clip)")
                    with pillow_limits(printable(name)):
                        image = _rgb(iio.imread(name, plugin="pillow"), printable(name))
                except InputError:
                    raise
                except DECODER_ERRORS as e:
                    raise InputError(f"{printable(name)}: unreadable image ({printable(e)})") from None
                yield index, image
            return
        if self.kind == "gif":
            import imageio.v3 as iio

            frames = iio.imiter(self.images[0], plugin="pillow")
            index = 0
            while True:
                try:
                    with pillow_limits(printable(self.spec)):
                        image = next(frames, None)
                    if image is None:
                        return
                    image = _rgb(image, printable(self.spec)) if selection.wants(index) else None
                except DECODER_ERRORS as e:
                    raise InputError(f"{printable(self.spec)}: unreadable {self._animated()} ({printable(e)})") from None
                if image is not None:
                    yield index, image
                index += 1
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = container.decode(stream)
            index = -1
            while True:
                index += 1
                try:
                    frame = next(frames, None)
                    if frame is None:
                        return
                    if not selection.wants(index):
                        continue  # decoded but not converted: cheap skipping
                    pixels(frame.width, frame.height, printable(self.spec), self.max_pixels)
                    image = frame.to_ndarray(format="rgb24")
                    turns = (int(frame.rotation or 0) // 90) % 4  # counterclockwise quarter turns for display
                except InputError:
                    raise
                except DECODER_ERRORS as e:
                    raise InputError(f"{printable(self.spec)}: corrupt video data "
                                     f"({printable(getattr(e, 'strerror', None) or e)})") from None
                yield index, np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def describe_video(spec: str | os.PathLike) -> dict:
    """What `vaecli info` prints for a video, GIF or image sequence (decodes one frame for the size)."""
    source = FrameSource(spec)
    index, first = next(source.frames())
    return {
        "kind": source.kind if source.kind != "video" else "video",
        "path": source.spec,
        "codec": source.codec,
        "frames": source.count,
        "fps": f"{source.fps.numerator}/{source.fps.denominator}",
        "fps_float": round(float(source.fps), 4),
        "width": int(first.shape[1]),
        "height": int(first.shape[0]),
        "duration_s": round(source.count / float(source.fps), 3) if source.count else None,
    }


class VideoWriter:
    """Encode uint8 (H, W, 3) frames to mp4 (H.264) or webm (VP9) with PyAV, frame by frame.

    H.264/VP9 use yuv420p, which needs even sizes; odd sizes are written as yuv444p so that the size is kept.
    """

    CODECS = {"mp4": "libx264", "webm": "libvpx-vp9"}

    def __init__(self, path: str | os.PathLike, fmt: str, fps: Fraction, size: tuple[int, int], crf: int = 18):
        if fmt not in self.CODECS:
            raise UsageError(f"video format must be one of {', '.join(self.CODECS)}, not {fmt!r}")
        width, height = size
        try:
            self.container = av.open(str(path), "w", format=fmt)
            self.stream = self.container.add_stream(self.CODECS[fmt], rate=fps)
        except (av.error.FFmpegError, OSError) as e:
            raise OutputError(f"{path}: cannot write ({e})") from None
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        self.stream.options = {"crf": str(crf)} if fmt == "mp4" else {"crf": str(crf), "b:v": "0"}
        self.path = path

    def write(self, image: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        self._mux(self.stream.encode(frame))

    def _mux(self, packets) -> None:
        try:
            self.container.mux(packets)
        except OSError as e:
            raise write_error(self.path, e) from None

    def close(self) -> None:
        self._mux(self.stream.encode(None))
        self.container.close()

    def abort(self) -> None:
        try:
            self.container.close()
        except (av.error.FFmpegError, OSError):
            pass  # the partial file is deleted by the caller


class GifWriter:
    """Animated GIF through Pillow (palette per frame, looping). Frame delays are whole centiseconds, so the
    frame rate is rounded; the frames are kept until `close()` writes the file, so GIF suits short clips."""

    def __init__(self, path: str | os.PathLike, fps: Fraction):
        self.path, self.delay_ms = path, 1000 / float(fps)
        self.frames: list = []

    def write(self, image: np.ndarray) -> None:
        from PIL import Image

        self.frames.append(Image.fromarray(image))

    def close(self) -> None:
        if not self.frames:
            raise OutputError(f"{self.path}: no frames to write")
        first, rest = self.frames[0], self.frames[1:]
        try:
            with open(self.path, "wb") as f:
                first.save(f, format="GIF", save_all=True, append_images=rest, duration=self.delay_ms, loop=0)
        except OSError as e:
            raise write_error(self.path, e) from None
        finally:
            self.frames = []

    def abort(self) -> None:
        self.frames = []


class PngWriter:
    """Write frames as numbered lossless PNGs into a folder (`frame_00000.png`) or after a `%05d` pattern;
    with `single`, the one frame of a one-frame clip to that file (a second frame is an error)."""

    def __init__(self, folder: Path, pattern: str = "frame_%05d.png", single: Path | None = None):
        self.folder, self.pattern, self.single, self.count = folder, pattern, single, 0

    def write(self, image: np.ndarray) -> None:
        import imageio.v3 as iio

        if self.single is not None and self.count:
            raise UsageError(f"{self.single} names one image but there is more than one frame; use a %05d pattern "
                             "or a folder/")
        target = self.single if self.single is not None else self.folder / (self.pattern % self.count)
        try:
            iio.imwrite(target, image, extension=".png")
        except OSError as e:
            raise write_error(target, e) from None
        self.count += 1

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass
