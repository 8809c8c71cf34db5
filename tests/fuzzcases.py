"""Seeded generators of bad (and some good) inputs for vaecli's commands; `tests/fuzzrun.py` runs and judges them.

Used by `tests/test_fuzz.py` (a few hundred cases in the normal test run) and `scripts/fuzz.py` (long runs).
Each case gets its own folder holding its inputs; it runs in-process through the CLI's entry point (Typer's
CliRunner on `vaecli.cli.app`, as the console script does) under a per-case time limit, and must end with
- exit 0 and a valid output (a latent file with finite values, a readable video or image, a readable checkpoint,
  or text on stdout for info/plan), or
- exit 1 or 2 with one `error: ...` line per failing input on stderr and no traceback;
and in both cases leave nothing in its folder but its inputs and, on success, its outputs.

Families (each mutates a valid file made once per corpus): latent files (metadata values, header JSON, shapes,
offsets, dtypes, truncation, NaN/inf data), checkpoints (header, tensors with NaN/inf, shapes, diffusers
config.json, pickles, non-regular files), videos and images (tiny sizes, truncation, bit flips, playlists,
decompression bombs, FIFOs), option values (numbers out of range, wrong types, unknown options, outputs that
name folders, patterns or protected paths) and the Wan family (frame counts off the 1 + 4k rule with and without
`--frames-fit`, latent spaces, mutated Wan checkpoints, latent files with damaged `frames_fit` / `latents.space`
metadata or 5-D shapes).
"""

from __future__ import annotations

import json
import os
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from helpers import make_video, random_vae, randomise, tiny_config

CONFIG = tiny_config(ch_mult=(1, 1), num_res_blocks=2, name="fuzz")  # downscale 2: tiny and fast
TIME_LIMIT = 30.0  # seconds per case: a hang fails the case


@dataclass
class Case:
    family: str
    name: str
    folder: Path
    args: list[str]
    outputs: list[str] = field(default_factory=list)  # names in `folder` a successful run may create
    check: str = ""  # how to validate a successful output: latents, video, image, frames, checkpoint, text


class Corpus:
    """The valid files the mutations start from (made once, in `root`)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.model = root / "model.safetensors"
        vae = random_vae(CONFIG, seed=5)
        self.state = {k: v.contiguous() for k, v in vae.state_dict().items()}
        save_file(self.state, str(self.model))
        self.video = root / "clip.mp4"
        make_video(self.video, n=3, width=16, height=12)
        self.latents = root / "clip.latents.safetensors"
        from typer.testing import CliRunner

        from vaecli.cli import app

        done = CliRunner().invoke(app, ["encode", str(self.video), "-m", str(self.model), "-o", str(self.latents),
                                        "-q"])
        assert done.exit_code == 0, done.stderr
        self.latents_bytes = self.latents.read_bytes()
        self.model_bytes = self.model.read_bytes()
        self.video_bytes = self.video.read_bytes()
        self.png_bytes = _png(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8))
        gif = root / "clip.gif"
        import imageio.v3 as iio

        iio.imwrite(gif, np.random.default_rng(1).integers(0, 255, (3, 12, 16, 3), dtype=np.uint8),
                    extension=".gif", duration=100, loop=0)
        self.gif_bytes = gif.read_bytes()
        self._wan(CliRunner(), app)

    def _wan(self, runner, app) -> None:
        """A tiny random Wan 2.1 model (Kijai's `model.` prefix), a 7-frame clip and its 5-frame latent file."""
        from vaecli.model.wan.config import WanConfig
        from vaecli.model.wan.modules import WanVAE

        vae = WanVAE(WanConfig(dim=3, dim_mult=(1, 1, 1, 1), num_res_blocks=1, name="fuzz-wan"))
        randomise(vae, 6)
        self.wan_state = {f"model.{k}": v.contiguous() for k, v in vae.state_dict().items()}
        self.wan_model = self.root / "wan.safetensors"
        save_file(self.wan_state, str(self.wan_model))
        self.wan_video = self.root / "wan.mp4"
        make_video(self.wan_video, n=7, width=16, height=16)
        self.wan_latents = self.root / "wan.latents.safetensors"
        done = runner.invoke(app, ["encode", str(self.wan_video), "-m", str(self.wan_model), "-o",
                                   str(self.wan_latents), "--frames-fit", "pad", "-q"])
        assert done.exit_code == 0, done.stderr
        self.wan_latents_bytes = self.wan_latents.read_bytes()


def _png(image: np.ndarray) -> bytes:
    import io

    import imageio.v3 as iio

    buf = io.BytesIO()
    iio.imwrite(buf, image, extension=".png")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height with a tiny compressed body (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * (1 << 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------ safetensors editing


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict | str | bytes, body: bytes, pad: bool = True) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


WEIRD_NUMBERS = ["abc", "", "0", "-1", "0/0", "1/0", "24/-1", "-24", "1e308", "1e-320", "nan", "inf", "-inf",
                 "0x1p-3", "1/3", "30000/1001", "24", "7.5", "  12 ", "10" * 40, "1_000", "½", "\x1b[31m", "24\n"]
CONTROL = ["\x1b[2J\x1b[31mred", "line\nbreak", "\r\rcarriage", "\x00nul", "tab\tbell\x07", "\u202eevil"]


def weird_json(rng: random.Random) -> str:
    choices = [
        "null", "[]", "{}", "[1, 2]", '"text"', "1e999", "NaN", "{" * 5000 + "}" * 5000, "[" * 100000,
        json.dumps({"source": [-16, 12], "resized": [16, 12], "processed": [16, 12], "fit": "pad", "box": [0, 0, 16, 12]}),
        json.dumps({"source": [100000, 100000], "resized": [100000, 100000], "processed": [16, 12], "fit": "resize",
                    "box": [0, 0, 0, 0]}),
        json.dumps({"source": [20000, 20000], "resized": [16, 12], "processed": [16, 12], "fit": "pad",
                    "box": [0, 0, 16, 12]}),
        json.dumps({"source": [16.5, 12], "resized": [16, 12], "processed": [16, 12], "fit": "pad", "box": [0, 0, 16, 12]}),
        json.dumps({"source": [16, 12], "resized": [16, 12], "processed": [16, 12], "fit": "pad", "box": [-5, 0, 99, 12]}),
        json.dumps({"source": [16, 12], "resized": [16, 12], "processed": [32, 24], "fit": "pad", "box": [0, 0, 16, 12]}),
        json.dumps({"source": [16, 12], "resized": [16, 12], "processed": [16, 12], "fit": "stretch", "box": [0, 0, 16, 12]}),
        json.dumps({"source": [15, 11], "resized": [15, 11], "processed": [16, 12], "fit": "pad", "box": [0, 0, 15, 11]}),
        json.dumps({"source": [17, 13], "resized": [17, 13], "processed": [16, 12], "fit": "crop", "box": [0, 0, 16, 12]}),
        json.dumps({"source": [1, 1], "resized": [1, 1], "processed": [16, 12], "fit": "resize", "box": [0, 0, 0, 0]}),
    ]
    return rng.choice(choices)


def mutate_latents(rng: random.Random, corpus: Corpus) -> tuple[str, bytes]:
    header, body = split_safetensors(corpus.latents_bytes)
    meta = header["__metadata__"]
    kind = rng.choice(["meta-number", "meta-geometry", "meta-control", "meta-drop", "shape", "dtype", "offsets",
                       "header-json", "truncate", "flip", "nonfinite", "header-len", "extra-tensor", "valid"])
    entry = header["latents"]
    t, c, h, w = entry["shape"]
    if kind == "meta-number":
        key = rng.choice(["fps", "scaling_factor", "frame_count", "frame_start", "frame_stride", "latent_channels"])
        meta[key] = rng.choice(WEIRD_NUMBERS)
        return f"{kind}:{key}={meta[key]!r}", join_safetensors(header, body)
    if kind == "meta-geometry":
        meta["geometry"] = weird_json(rng)
        return f"{kind}:{meta['geometry'][:40]!r}", join_safetensors(header, body)
    if kind == "meta-control":
        key = rng.choice(["source", "model.name", "time_mode", "posterior", "model.hash", "vaecli.version"])
        meta[key] = rng.choice(CONTROL)
        return f"{kind}:{key}", join_safetensors(header, body)
    if kind == "meta-drop":
        for key in rng.sample(sorted(meta), rng.randint(1, len(meta))):
            del meta[key]
        if rng.random() < 0.3:
            del header["__metadata__"]
        return kind, join_safetensors(header, body)
    if kind == "shape":
        choice = rng.choice([[0, c, h, w], [t, c, 0, w], [t, c, h, 0], [10**6, c, h, w], [t, c, h], [t, c, h, w, 1],
                             [t, c + 1, h, w], [t, c, h * 2, w], [t * c * h * w], [-t, c, h, w], [t, c, h, 1.5],
                             [t, 0, h, w], [2**62, 1, 1, 1], "abc"])
        entry["shape"] = choice
        return f"{kind}:{choice}", join_safetensors(header, body)
    if kind == "dtype":
        entry["dtype"] = rng.choice(["I32", "U8", "F64", "BOOL", "F8_E4M3", "Q4", "", None, 7])
        return f"{kind}:{entry['dtype']}", join_safetensors(header, body)
    if kind == "offsets":
        entry["data_offsets"] = rng.choice([[0, 10**12], [-8, len(body)], [len(body), 0], [0], None, "0,1",
                                            [0, float("inf")], [0.5, len(body)], [8, len(body) + 8]])
        text = json.dumps(header, allow_nan=True)
        return f"{kind}:{entry['data_offsets']}", join_safetensors(text, body)
    if kind == "header-json":
        raw = rng.choice(["[]", "null", "{", '{"latents": 5}', "{" * 3000 + "}" * 3000, '{"a":' * 2000 + "1" + "}" * 2000,
                          json.dumps({"latents": {"dtype": "F32", "shape": [1, 4, 6, 8], "data_offsets": [0, 768]},
                                      "mean": {"dtype": "F32", "shape": [1, 4, 6, 8], "data_offsets": [0, 768]}}),
                          "\xff\xfe", '{"__metadata__": [1]}', '{"__metadata__": {"fps": 24}}'])
        return f"{kind}:{raw[:30]!r}", join_safetensors(raw.encode("utf-8", "surrogatepass"), body)
    data = corpus.latents_bytes
    if kind == "truncate":
        cut = rng.randint(0, len(data) - 1)
        return f"{kind}:{cut}", data[:cut]
    if kind == "flip":
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        return kind, bytes(buf)
    if kind == "nonfinite":
        values = np.frombuffer(body, dtype=np.float32).copy()
        for _ in range(rng.randint(1, 3)):
            values[rng.randrange(values.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return kind, join_safetensors(header, values.tobytes())
    if kind == "header-len":
        n = rng.choice([0, 1, 7, 2**63, 2**40, len(data)])
        return f"{kind}:{n}", struct.pack("<Q", n) + data[8:]
    if kind == "extra-tensor":
        header["junk\n\x1b[31m"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        return kind, join_safetensors(header, body)
    return "valid", data


def mutate_checkpoint(rng: random.Random, corpus: Corpus, folder: Path) -> tuple[str, str]:
    """Write a mutated checkpoint in `folder`; returns (what, the --model argument)."""
    kind = rng.choice(["nonfinite", "shape", "missing", "dtype", "header", "truncate", "pickle", "empty",
                       "diffusers-config", "fifo", "folder", "valid"])
    path = folder / "vae.safetensors"
    state = dict(corpus.state)
    if kind == "nonfinite":
        key = rng.choice(sorted(state))
        t = state[key].clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        state[key] = t
        save_file(state, str(path))
        return f"{kind}:{key}", str(path)
    if kind == "shape":  # one tensor's shape no longer agrees with the others'
        key = rng.choice(sorted(state))
        t = state[key]
        state[key] = rng.choice([torch.zeros(*[d + 1 for d in t.shape]) if t.ndim else torch.zeros(2),
                                 t.reshape(-1).clone(), torch.zeros(()), t[None].clone(), torch.zeros(0)])
        save_file(state, str(path))
        return f"{kind}:{key}", str(path)
    if kind == "missing":
        for key in rng.sample(sorted(state), rng.randint(1, 5)):
            del state[key]
        save_file(state, str(path))
        return kind, str(path)
    if kind == "dtype":
        key = rng.choice(sorted(state))
        state[key] = state[key].to(torch.int8)
        save_file(state, str(path))
        return f"{kind}:{key}", str(path)
    if kind == "header":
        header, body = split_safetensors(corpus.model_bytes)
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        header[name]["data_offsets"] = rng.choice([[0, 10**15], "x", [5, 1], [0, float("inf")]])
        if rng.random() < 0.3:
            path.write_bytes(join_safetensors("{" * 4000 + "}" * 4000, body))
        else:
            path.write_bytes(join_safetensors(json.dumps(header, allow_nan=True), body))
        return kind, str(path)
    if kind == "truncate":
        path.write_bytes(corpus.model_bytes[: rng.randint(0, len(corpus.model_bytes) - 1)])
        return kind, str(path)
    if kind == "pickle":
        path = folder / "vae.ckpt"
        path.write_bytes(b"PK\x03\x04" + os.urandom(64))
        return kind, str(path)
    if kind == "empty":
        path.write_bytes(b"")
        return kind, str(path)
    if kind == "diffusers-config":
        from vaecli.model.svd.layout import to_layout

        d = folder / "vae_diffusers"
        d.mkdir()
        dstate, _ = to_layout(corpus.state, CONFIG, "diffusers")
        save_file({k: v.contiguous() for k, v in dstate.items()}, str(d / "diffusion_pytorch_model.safetensors"))
        config = rng.choice(["[1, 2]", "{" * 3000 + "}" * 3000, '{"scaling_factor": "abc"}', '{"scaling_factor": NaN}',
                             '{"scaling_factor": -1}', '{"scaling_factor": 1e400}', "not json", '{"scaling_factor": 0.5}',
                             '{"scaling_factor": [1]}', '{"scaling_factor": {"a": 1}}', '{"scaling_factor": true}',
                             '{"scaling_factor": null}', b"\xff\xfe{}".decode("latin-1")])
        (d / "config.json").write_text(config)
        return f"{kind}:{config[:20]!r}", str(d)
    if kind == "fifo":
        os.mkfifo(path)
        return kind, str(path)
    if kind == "folder":
        (folder / "empty_dir").mkdir()
        return kind, str(folder / "empty_dir")
    path.write_bytes(corpus.model_bytes)
    return "valid", str(path)


def _odd_image(rng: random.Random, kind: str, folder: Path) -> tuple[str, str]:
    """Images of several frames (multi-page TIFF, animated PNG/WebP, alone or inside a sequence) or of unusual
    layouts (16-bit, gray + alpha, 1-bit, palette)."""
    from PIL import Image

    pix = np.random.default_rng(rng.randrange(99)).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    if kind == "multi-frame":
        pages = [Image.fromarray(np.roll(pix, i, 1)) for i in range(rng.randint(2, 4))]
        name = rng.choice(["pages.tif", "anim.png", "anim.webp"])
        target = folder / name
        inside = rng.random() < 0.4
        if inside:  # one animated member among still images
            (folder / "seq").mkdir()
            Image.fromarray(pix).save(folder / "seq" / "a.png")
            target = folder / "seq" / name
        pages[0].save(target, save_all=True, append_images=pages[1:], duration=100)
        return f"{kind}:{name}{' in a sequence' if inside else ''}", str(folder / "seq" if inside else target)
    mode = rng.choice(["I;16", "LA", "1", "P", "RGBA", "I", "F"])
    image = Image.fromarray(pix).convert("L" if mode in ("I;16", "I", "F") else "RGB")
    image = image.convert(mode) if mode not in ("I;16",) else Image.fromarray(pix[:, :, 0].astype(np.uint16) * 257)
    name = "odd.tif" if mode in ("F", "I") else "odd.png"
    image.save(folder / name)
    return f"{kind}:{mode}", str(folder / name)


def mutate_media(rng: random.Random, corpus: Corpus, folder: Path) -> tuple[str, str]:
    """Write a mutated video or image in `folder`; returns (what, the input argument)."""
    kind = rng.choice(["tiny-png", "tiny-gif", "tiny-video", "truncate", "flip", "playlist", "bomb", "fifo", "empty",
                       "random", "folder", "valid-png", "valid-gif", "valid", "multi-frame", "odd-layout"])
    import imageio.v3 as iio

    if kind in ("multi-frame", "odd-layout"):
        return _odd_image(rng, kind, folder)

    if kind == "tiny-png":
        w, h = rng.choice([(1, 1), (2, 2), (7, 3), (3, 7), (1, 9), (9, 1)])
        path = folder / "tiny.png"
        path.write_bytes(_png(np.random.default_rng(rng.randrange(99)).integers(0, 255, (h, w, 3), dtype=np.uint8)))
        return f"{kind}:{w}x{h}", str(path)
    if kind == "tiny-gif":
        w, h = rng.choice([(1, 1), (2, 2), (7, 3)])
        path = folder / "tiny.gif"
        iio.imwrite(path, np.random.default_rng(3).integers(0, 255, (2, h, w, 3), dtype=np.uint8), extension=".gif",
                    duration=50, loop=0)
        return f"{kind}:{w}x{h}", str(path)
    if kind == "tiny-video":
        w, h = rng.choice([(2, 2), (4, 2), (6, 4)])
        path = folder / "tiny.mp4"
        make_video(path, n=2, width=w, height=h)
        return f"{kind}:{w}x{h}", str(path)
    if kind in ("truncate", "flip", "valid", "valid-png", "valid-gif"):
        source, suffix = rng.choice([(corpus.video_bytes, ".mp4"), (corpus.gif_bytes, ".gif"),
                                     (corpus.png_bytes, ".png"), (corpus.video_bytes, ".mkv")])
        if kind == "valid-png":
            source, suffix = corpus.png_bytes, ".png"
        if kind == "valid-gif":
            source, suffix = corpus.gif_bytes, ".gif"
        data = bytearray(source)
        if kind == "truncate":
            data = data[: rng.randint(0, len(data) - 1)]
        elif kind == "flip":
            for _ in range(rng.randint(1, 20)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        path = folder / f"input{suffix}"
        path.write_bytes(bytes(data))
        return f"{kind}{suffix}", str(path)
    if kind == "playlist":
        (folder / "other.mp4").write_bytes(corpus.video_bytes)
        name = rng.choice(["list.m3u8", "disguised.mp4", "concat.txt"])
        text = ("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nother.mp4\n#EXT-X-ENDLIST\n" if name != "concat.txt"
                else "ffconcat version 1.0\nfile other.mp4\n")
        (folder / name).write_text(text)
        return f"{kind}:{name}", str(folder / name)
    if kind == "bomb":
        w, h = rng.choice([(12000, 12000), (100000, 100), (65535, 65535)])
        path = folder / "bomb.png"
        path.write_bytes(png_bomb(w, h))
        return f"{kind}:{w}x{h}", str(path)
    if kind == "fifo":
        path = folder / rng.choice(["pipe.mp4", "pipe.png", "pipe.gif"])
        os.mkfifo(path)
        return kind, str(path)
    if kind == "empty":
        path = folder / rng.choice(["empty.mp4", "empty.png", "empty.gif"])
        path.write_bytes(b"")
        return kind, str(path)
    if kind == "random":
        path = folder / rng.choice(["noise.mp4", "noise.png", "noise.gif", "noise.webm"])
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000))))
        return kind, str(path)
    frames = folder / "frames"
    frames.mkdir()
    sizes = rng.choice([[(16, 12)] * 3, [(16, 12), (18, 12)], [(16, 12), (0, 0)]])
    for i, (w, h) in enumerate(sizes):
        p = frames / f"f{i:03d}.png"
        p.write_bytes(_png(np.zeros((h, w, 3), np.uint8)) if w else b"junk")
    return f"{kind}:{sizes}", str(frames)


LONG = "9" * 400  # digit strings past any range (and past Python's int/float conversions)
BAD_VALUES = {
    "--crf": ["-1", "inf", "99", "64", "52", "10" * 30, "abc", "0", "63"],
    "--fps": ["-1", "0", "abc", "1/0", "1e308", "0/0", "24", "nan", "0.001", "1e-300", "1/100000", LONG, "0.01",
              "10000", "10001", f"1/{LONG}"],
    "--batch": ["abc", "0", "-3", "1", "100000", LONG, "9" * 25],
    "--frames": ["0", "-1", "abc", "1", "2", "10" * 20, LONG],
    "--start": ["-1", "abc", "1000", "1", LONG],
    "--stride": ["0", "-2", "abc", "2", "1000", LONG],
    "--size": ["0x0", "abc", "16x", "-16x12", "100000x100000", "17x13", "16x12", "1x1"],
    "--fit": ["pad", "crop", "resize", "stretch", ""],
    "--max-memory": ["abc", "0", "-1GiB", "1B", "1e999", "512MiB", "10GiB", "1 PiB", LONG, "9" * 30 + "GiB",
                     "0.000001GiB"],
    "--chunk": ["-1", "0", "1", "abc", "2", LONG],
    "--overlap": ["-1", "0", "1", "5", "abc", LONG],
    "--tile": ["0", "3", "4", "abc", "100000", LONG],
    "--format": ["mp4", "webm", "gif", "png", "avi", "", "MP4"],
    "--latent-dtype": ["fp32", "fp16", "bf16", "int8", "abc"],
    "--dtype": ["fp32", "fp16", "bf16", "abc", "auto"],
    "--attention": ["auto", "math", "sdpa", "split", "xformers", "nope"],
    "--device": ["cpu", "cuda", "cuda:9", "tpu", "auto"],
    "--max-pixels": ["0", "-1", "abc", "100", "1", LONG],
    "--seed": ["-1", "abc", "3", LONG],
    "--export": ["comfy", "abc"],
    "--clip-frames": ["0", "-1", "abc", "1", LONG],
    "--scratch": ["", " ", "missing_dir", ".", "existing.txt"],
}
COMMAND_OPTIONS = {
    "encode": ["--crf", "--batch", "--frames", "--start", "--stride", "--size", "--fit", "--max-memory", "--latent-dtype",
               "--dtype", "--attention", "--device", "--max-pixels", "--seed", "--export"],
    "decode": ["--crf", "--fps", "--chunk", "--overlap", "--tile", "--format", "--max-memory", "--dtype", "--attention",
               "--device", "--max-pixels", "--scratch"],
    "roundtrip": ["--crf", "--frames", "--start", "--stride", "--fit", "--chunk", "--overlap", "--tile", "--max-memory",
                  "--clip-frames", "--max-pixels"],
    "plan": ["--frames", "--max-memory", "--size", "--fit", "--chunk", "--overlap", "--tile", "--batch", "--dtype",
             "--attention", "--device", "--max-pixels"],
}
DECODE_OUTPUTS = ["out.mp4", "out.webm", "out.gif", "one.png", "frames/", "img_%04d.png", "out", "out.safetensors",
                  "out.mkv", "x_%d_%d.png", "missing/dir/out.mp4", "f_%999999999999d.png", "f_%0999d.png",
                  "f_%099d.png"]


WAN_FRAMES_FIT = [None, None, "trim", "pad", "", "crop", "PAD", "trim pad"]
WAN_SPACES = [None, None, "normalized", "raw", "", "scaled", "Raw"]


def _wan_stats_case(rng: random.Random, corpus: Corpus, folder: Path) -> Case:
    """A diffusers Wan folder whose config.json has latents_mean/latents_std of a wrong length, non-finite,
    zero or negative std, or of the wrong type."""
    from vaecli.model.wan.config import WanConfig
    from vaecli.model.wan.keymap import original_to_diffusers
    from vaecli.model.wan.layout import diffusers_config

    config = WanConfig(dim=3, dim_mult=(1, 1, 1, 1), num_res_blocks=1, name="fuzz-wan")
    state = {k[len("model."):]: v for k, v in corpus.wan_state.items()}
    mapping = original_to_diffusers(state.keys(), config)
    d = folder / "wan_diffusers"
    d.mkdir()
    save_file({mapping[k]: v.contiguous() for k, v in state.items()}, str(d / "diffusion_pytorch_model.safetensors"))
    cfg = diffusers_config(config)
    key = rng.choice(["latents_mean", "latents_std"])
    z = config.z_dim
    cfg[key] = rng.choice([[0.0] * (z - 1), [1.0] * (z + 3), [float("nan")] * z, [float("inf")] * z, [0.0] * z,
                           [-1.0] * z, "abc", None, [[1.0]] * z, ["x"] * z, 5])
    (d / "config.json").write_text(json.dumps(cfg))
    if rng.random() < 0.5:
        return Case("wan", f"diffusers {key}={str(cfg[key])[:20]}", folder, ["info", str(d)], [], "text")
    return Case("wan", f"diffusers {key}={str(cfg[key])[:20]}", folder, ["encode", str(corpus.wan_video), "-m", str(d),
                "--frames", "5", "-o", str(folder / "z.latents.safetensors"), "-q"], ["z.latents.safetensors"], "latents")


def wan_case(rng: random.Random, corpus: Corpus, folder: Path) -> Case:
    """A Wan case: an encode of some frame count (with or without --frames-fit, a latent space, the ComfyUI
    export), a mutated Wan checkpoint, or a Wan latent file with damaged metadata or shape."""
    model = str(corpus.wan_model)
    kind = rng.choice(["frames", "frames", "checkpoint", "latents-meta", "latents-shape", "diffusers-stats"])
    if kind == "diffusers-stats":
        return _wan_stats_case(rng, corpus, folder)
    if kind == "frames":
        opts = ["--frames", str(rng.randint(1, 9))] if rng.random() < 0.8 else []
        fit = rng.choice(WAN_FRAMES_FIT)
        opts += ["--frames-fit", fit] if fit is not None else []
        if rng.random() < 0.3:  # roundtrip takes --frames-fit, not --latent-space
            return Case("wan", f"roundtrip {' '.join(opts)}", folder, ["roundtrip", str(corpus.wan_video), "-m", model,
                        "-o", str(folder / "r.mp4"), "-q"] + opts, ["r.mp4"], "video")
        space = rng.choice(WAN_SPACES)
        opts += ["--latent-space", space] if space is not None else []
        opts += ["--export", "comfy"] if rng.random() < 0.3 else []
        return Case("wan", f"encode {' '.join(opts)}", folder, ["encode", str(corpus.wan_video), "-m", model, "-o",
                    str(folder / "z.latents.safetensors"), "-q"] + opts, ["z.latents.safetensors", "z.latent"],
                    "latents")
    if kind == "checkpoint":
        state = dict(corpus.wan_state)
        key = rng.choice(sorted(state))
        t = state[key]
        change = rng.choice(["drop", "grow", "flat", "extra-dim", "nan", "int", "z48", "patches"])
        if change == "drop":
            del state[key]
        elif change in ("grow", "flat", "extra-dim"):
            state[key] = {"grow": torch.zeros(t.shape[0] + 1, *t.shape[1:]), "flat": t.reshape(-1),
                          "extra-dim": t[None]}[change]
        elif change == "nan":
            state[key] = torch.full_like(t, float("nan"))
        elif change == "int":
            state[key] = t.to(torch.int8)
        elif change == "z48":
            state["model.conv2.weight"] = torch.zeros(48, 48, 1, 1, 1)
        else:
            state["model.encoder.conv1.weight"] = torch.zeros(3, 12, 3, 3, 3)
        save_file(state, str(folder / "wan.safetensors"))
        arg = str(folder / "wan.safetensors")
        if rng.random() < 0.5:
            return Case("wan", f"checkpoint {change} {key}", folder, ["info", arg], [], "text")
        return Case("wan", f"checkpoint {change} {key}", folder, ["encode", str(corpus.wan_video), "-m", arg,
                    "--frames", "5", "-o", str(folder / "z.latents.safetensors"), "-q"], ["z.latents.safetensors"],
                    "latents")
    header, body = split_safetensors(corpus.wan_latents_bytes)
    meta = header["__metadata__"]
    if kind == "latents-meta":
        key = rng.choice(["frames_fit", "frames_fit", "latents.space", "frame_rule", "normalization", "model.family"])
        meta[key] = rng.choice([weird_json(rng), *CONTROL, json.dumps({"mode": "pad", "read": -1, "coded": 9}),
                                json.dumps({"mode": "pad", "read": 99, "coded": 9}),
                                json.dumps({"mode": "trim", "read": 3, "coded": 9}),
                                json.dumps({"mode": "pad", "read": 7, "coded": 5}), "raw", "normalized"])
        what = f"latents {key}={meta[key][:30]!r}"
    else:
        t, c, h, w = header["latents"]["shape"]
        header["latents"]["shape"] = rng.choice([[1, c, t, h, w], [2, c, t // 2 or 1, h, w], [1, c, t, h],
                                                 [1, 1, c, t, h, w], [t, c, w, h], [c, t, h, w]])
        what = f"latents shape {header['latents']['shape']}"
    path = folder / "in.latents.safetensors"
    path.write_bytes(join_safetensors(header, body))
    extra = ["--latent-space", rng.choice(["raw", "normalized"])] if rng.random() < 0.3 else []
    return Case("wan", what, folder, ["decode", str(path), "-m", model, "-o", str(folder / "frames/"), "-q"] + extra,
                ["frames"], "frames")


def text_case(rng: random.Random, corpus: Corpus, folder: Path) -> Case:
    """Text inputs with arbitrary bytes (a --manifest, a --config TOML) and empty strings as paths."""
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    kind = rng.choice(["manifest", "config", "empty-path"])
    model = str(corpus.model)
    if kind == "manifest":
        path = folder / "list.txt"
        printable = "".join(rng.choice("%=C ./x\\\"'#") for _ in range(rng.randint(1, 12))).encode()
        path.write_bytes(rng.choice([junk, str(corpus.video).encode() + b"\n" + junk, b"\xff\xfe" + junk,
                                     printable, str(corpus.video).encode() + b"\n" + printable]))
        return Case("text", "manifest of random bytes", folder, ["encode", "--manifest", str(path), "-m", model,
                    "--out-dir", str(folder), "-q"], [Path(corpus.video).name.replace(".mp4", ".latents.safetensors"),
                                                      "vaecli-batch.jsonl"], "any")
    if kind == "config":
        path = folder / "c.toml"
        path.write_bytes(rng.choice([junk, b'name = "x"\n' + junk, b'ch = "\xff"\n', b"ch = 99999999999999999999\n"]))
        command = rng.choice(["plan", "encode"])
        args = [command, str(corpus.video), "--config", str(path)]
        if command == "encode":
            args += ["-m", model, "-o", str(folder / "z.latents.safetensors"), "-q"]
        return Case("text", "config of random bytes", folder, args, ["z.latents.safetensors"], "any")
    option = rng.choice(["--out-dir", "-o", "--manifest", "--scratch", "--report"])
    value = rng.choice(["", " ", "\t"])
    command = {"--report": "roundtrip", "--scratch": "decode"}.get(option, rng.choice(["encode", "decode"]))
    source = str(corpus.latents if command == "decode" else corpus.video)
    args = [command, source, "-m", model, option, value, "-q"]
    if command == "roundtrip":
        args += ["-o", str(folder / "r.mp4")]
    return Case("text", f"{command} {option} {value!r}", folder, args, ["r.mp4"], "any")


def make_case(i: int, rng: random.Random, corpus: Corpus, root: Path) -> Case:
    folder = root / f"case{i:05d}"
    folder.mkdir(parents=True)
    model = str(corpus.model)
    family = rng.choice(["latents", "latents", "checkpoint", "media", "media", "options", "outputs", "wan", "text"])
    if family == "wan":
        return wan_case(rng, corpus, folder)
    if family == "text":
        return text_case(rng, corpus, folder)
    if family == "latents":
        what, data = mutate_latents(rng, corpus)
        path = folder / "in.latents.safetensors"
        path.write_bytes(data)
        command = rng.choice(["decode", "decode", "info", "plan"])
        if command == "decode":
            out = rng.choice(["out.mp4", "out.gif", "frames/"])
            return Case(family, what, folder, ["decode", str(path), "-m", model, "-o", str(folder / out), "-q"],
                        [out.rstrip("/")], "frames" if out.endswith("/") else "video")
        return Case(family, what, folder, [command, str(path)] + (["-m", model] if command == "plan" else []),
                    [], "text")
    if family == "checkpoint":
        what, arg = mutate_checkpoint(rng, corpus, folder)
        command = rng.choice(["info", "encode", "decode", "convert"])
        if command == "info":
            return Case(family, what, folder, ["info", arg], [], "text")
        if command == "encode":
            return Case(family, what, folder, ["encode", str(corpus.video), "-m", arg, "-o",
                                               str(folder / "z.latents.safetensors"), "-q"],
                        ["z.latents.safetensors"], "latents")
        if command == "convert":
            to = rng.choice(["sgm", "diffusers"])
            out = "conv.safetensors" if to == "sgm" or rng.random() < 0.5 else "conv_folder"
            return Case(family, what, folder, ["convert", arg, "-o", str(folder / out), "--to", to], [out], "checkpoint")
        return Case(family, what, folder, ["decode", str(corpus.latents), "-m", arg, "-o", str(folder / "o.mp4"),
                                           "--allow-model-mismatch", "-q"], ["o.mp4"], "video")
    if family == "media":
        what, arg = mutate_media(rng, corpus, folder)
        command = rng.choice(["encode", "encode", "info", "roundtrip", "plan"])
        if command == "encode":
            return Case(family, what, folder, ["encode", arg, "-m", model, "-o", str(folder / "z.latents.safetensors"),
                                               "-q"], ["z.latents.safetensors"], "latents")
        if command == "roundtrip":
            return Case(family, what, folder, ["roundtrip", arg, "-m", model, "-o", str(folder / "r.mp4"), "-q"],
                        ["r.mp4"], "video")
        return Case(family, what, folder, [command, arg] + (["-m", model] if command == "plan" else []), [], "text")
    if family == "options":
        return options_case(rng, corpus, folder)
    return outputs_case(rng, corpus, folder)


def options_case(rng: random.Random, corpus: Corpus, folder: Path) -> Case:
    """Out-of-range, mistyped and unknown option values for one command."""
    family, model = "options", str(corpus.model)
    command = rng.choice(list(COMMAND_OPTIONS))
    chosen = rng.sample(COMMAND_OPTIONS[command], rng.randint(1, 3))
    opts = []
    for name in chosen:
        opts += [name, rng.choice(BAD_VALUES[name])]
    if rng.random() < 0.1:
        opts.append(rng.choice(["--bogus", "--frames", "-x", "--sample", "--save-moments", "--native-size"]))
    if command == "encode":
        args = ["encode", str(corpus.video), "-m", model, "-o", str(folder / "z.latents.safetensors"), "-q"] + opts
        return Case(family, " ".join(opts), folder, args, ["z.latents.safetensors", "z.latent"], "latents")
    if command == "decode":
        out = "o.webm" if "--format" in opts and opts[opts.index("--format") + 1] == "webm" else "o.mp4"
        args = ["decode", str(corpus.latents), "-m", model, "-o", str(folder / out), "-q"] + opts
        if "--format" in opts:
            args[args.index("-o") + 1] = str(folder / "o")
            out = "o"
        return Case(family, " ".join(opts), folder, args, [out], "any")
    if command == "roundtrip":
        args = ["roundtrip", str(corpus.video), "-m", model, "-o", str(folder / "r.mp4"), "-q"] + opts
        return Case(family, " ".join(opts), folder, args, ["r.mp4"], "video")
    return Case(family, " ".join(opts), folder, ["plan", str(corpus.video), "-m", model] + opts, [], "text")


def outputs_case(rng: random.Random, corpus: Corpus, folder: Path) -> Case:
    """Output names that are folders, patterns, other formats, protected paths or existing files."""
    family, model = "outputs", str(corpus.model)
    out = rng.choice(DECODE_OUTPUTS + ["existing_dir", "existing_dir/", ".", "..", "existing.mp4"])
    (folder / "existing_dir").mkdir()
    (folder / "existing_dir" / "notes.txt").write_text("keep me")
    (folder / "existing.mp4").write_text("keep me too")
    extra = ["--overwrite"] if rng.random() < 0.5 else []
    if rng.random() < 0.5:
        target = str(folder / out) if out not in (".", "..") else out
        return Case(family, f"decode -o {out} {' '.join(extra)}", folder,
                    ["decode", str(corpus.latents), "-m", model, "-o", target, "-q"] + extra,
                    [out.rstrip("/").split("/")[0]] if out not in (".", "..") else [], "any")
    out = rng.choice(["z.latents.safetensors", "z.mp4", "existing_dir", "newdir/", "existing.mp4", ".", ".."])
    target = str(folder / out) if out not in (".", "..") else out
    return Case(family, f"encode -o {out} {' '.join(extra)}", folder,
                ["encode", str(corpus.video), "-m", model, "-o", target, "-q"] + extra,
                [out.rstrip("/")] if out not in (".", "..") else [], "latents")
