"""How the exact streaming executor (`vaecli.model.svd.streaming`) cuts a clip: `Pieces`, a frozen value the
planner chooses and the executor runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pieces:
    """How a streaming run cuts the clip. Per-frame (2D) stages and temporal stages are cut separately: a 2D
    stage costs memory per whole frame, a temporal stage per pixel across frames (and needs no spatial halo).

    frames: frames per chunk of the per-frame stages.
    tile: their tile side in latent pixels (None: whole frames). A stage whose output is s times the latent size
        uses tiles of s·tile pixels, so every level is cut the same way.
    time_frames: frames per piece of the temporal stages (None: all frames of the clip, no frame halo).
    time_tile: their tile side in latent pixels (None: whole frames).
    park: keep the clip's activation between stages in host memory (pinned on CUDA); pieces are copied to the
        device, computed and copied back.
    keep: with 2D tiles, keep a ResnetBlock's conv1 output for the chunk (one more chunk-sized tensor) instead of
        computing it again after its statistics are known (a third fewer convolutions in tiled 2D layers).
    disk: keep the clip's activation between stages in scratch files on disk (`vaecli.ops.scratch`), each piece
        read into memory, computed and written back (for clips whose activation fits nowhere in memory).
    band: the temporal layers' tiles span the frame's whole width (bands of `time_tile` latent rows), so on disk
        each frame's part of a piece is one contiguous read.
    """

    frames: int
    tile: int | None = None
    time_frames: int | None = None
    time_tile: int | None = None
    park: bool = False
    keep: bool = False
    disk: bool = False
    band: bool = False

    def __post_init__(self) -> None:
        for name in ("frames", "tile", "time_frames", "time_tile"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Pieces.{name} must be at least 1, got {value}")

    def to_dict(self) -> dict:
        return {"frames": self.frames, "tile_latent": self.tile, "time_frames": self.time_frames,
                "time_tile_latent": self.time_tile, "parked": self.park, "keep_conv1": self.keep, "disk": self.disk,
                "time_bands": self.band}

    def describe(self) -> str:
        def cut(frames, tile, band=False):
            f = "all frames" if frames is None else f"{frames} frame{'s' if frames != 1 else ''}"
            if tile and band:
                return f + f" x bands of {tile} latent px rows"
            return f + (f" x {tile}x{tile} latent px tiles" if tile else " (whole frames)")
        return (f"2D layers {cut(self.frames, self.tile)}; temporal layers "
                f"{cut(self.time_frames, self.time_tile, self.band)}"
                + ("; conv1 outputs kept per chunk" if self.keep and self.tile else "")
                + ("; clip parked in host memory" if self.park else "")
                + ("; clip kept in scratch files on disk" if self.disk else ""))
