"""`VAEConfig`: the architecture of one VAE as a frozen dataclass, loaded from `configs/*.toml`.

What tensor shapes cannot tell (scaling factor, merge strategy, a name) comes from a named config; everything
else can be inferred from a checkpoint (`vaecli.model.checkpoint.infer_config`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources

from vaecli.errors import UsageError

TIME_MODES = ("image", "conv-only", "all", "attn-only", "only-last-conv")
MERGE_STRATEGIES = ("fixed", "learned", "learned_with_images")


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a KL VAE with an optional temporal decoder (sgm naming).

    ch, ch_mult, num_res_blocks: level widths are `ch * ch_mult[i]`; the encoder has `num_res_blocks`
        ResnetBlocks per level, the decoder `num_res_blocks + 1`; spatial compression is 2**(len(ch_mult)-1).
    z_channels: channels between the decoder's conv_in / the encoder's conv_out and the latent space.
    embed_dim: latent channels seen by the user; differs from z_channels only with quant convs (ldm `embed_dim`).
    attn_levels: levels (0 = full resolution) that have attention after each ResnetBlock (sgm `attn_resolutions`).
    time_mode: "image" (2D decoder), or the SVD VideoDecoder modes "conv-only", "all", "attn-only", "only-last-conv".
    video_kernel_size: (t, h, w) kernel of the temporal convolutions.
    merge_strategy: how `mix_factor` becomes the blend weight α ("fixed": α = mix_factor; "learned": α =
        sigmoid(mix_factor); "learned_with_images": as learned, but frames flagged as images take the spatial path).
    quant_conv / post_quant_conv: 1x1 convs around the latent (plain SD VAE: both; diffusers SVD: quant_conv only).
    scaling_factor: latents are stored multiplied by it (diffusers/ComfyUI convention).
    """

    name: str = "custom"
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    attn_levels: tuple[int, ...] = ()
    time_mode: str = "conv-only"
    video_kernel_size: tuple[int, int, int] = (3, 1, 1)
    merge_strategy: str = "learned"
    alpha: float = 0.0
    quant_conv: bool = False
    post_quant_conv: bool = False
    scaling_factor: float = 0.18215
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_levels", tuple(self.attn_levels))
        object.__setattr__(self, "video_kernel_size", tuple(self.video_kernel_size))
        if self.time_mode not in TIME_MODES:
            raise UsageError(f"unknown time_mode {self.time_mode!r}; choose one of {', '.join(TIME_MODES)}")
        if self.merge_strategy not in MERGE_STRATEGIES:
            raise UsageError(
                f"unknown merge_strategy {self.merge_strategy!r}; choose one of {', '.join(MERGE_STRATEGIES)}"
            )
        if len(self.video_kernel_size) != 3 or any(k % 2 == 0 for k in self.video_kernel_size):
            raise UsageError(f"video_kernel_size must be three odd numbers, got {self.video_kernel_size}")
        if not self.ch_mult or any(self.ch * m % 32 for m in self.ch_mult):
            raise UsageError(f"channel widths ch*ch_mult = {[self.ch * m for m in self.ch_mult]} must be multiples of 32")
        if not self.quant_conv and not self.post_quant_conv and self.embed_dim != self.z_channels:
            raise UsageError("embed_dim differs from z_channels, which needs quant_conv/post_quant_conv")

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    @property
    def downscale(self) -> int:
        """Spatial compression factor (8 for SD/SVD)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def is_video(self) -> bool:
        return self.time_mode != "image"

    def replace(self, **changes) -> "VAEConfig":
        return dataclasses.replace(self, **changes)

    def architecture(self) -> dict:
        """The fields that determine tensor shapes (what two configs must share to load the same file)."""
        keep = ("in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim",
                "attn_levels", "time_mode", "video_kernel_size", "quant_conv", "post_quant_conv")
        return {k: getattr(self, k) for k in keep}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("ch_mult", "attn_levels", "video_kernel_size"):
            d[k] = list(d[k])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UsageError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**d)


def named_configs() -> dict[str, VAEConfig]:
    """All configs shipped in `configs/*.toml`, by name (the file stem)."""
    out = {}
    for entry in resources.files("vaecli.configs").iterdir():
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            name = entry.name[: -len(".toml")]
            out[name] = VAEConfig.from_dict({"name": name, **data})
    return out


def load_config(name_or_path: str) -> VAEConfig:
    """A named config (`svd-vae`, `sd-vae`, `sdxl-vae`, ...) or the path of a TOML file."""
    if name_or_path.endswith(".toml"):
        try:
            with open(name_or_path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise UsageError(f"cannot read config {name_or_path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"config {name_or_path} is not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise UsageError(f"config {name_or_path} is not UTF-8 text (a TOML file is)") from None
        data.setdefault("name", name_or_path.rsplit("/", 1)[-1][: -len(".toml")])
        return VAEConfig.from_dict(data)
    configs = named_configs()
    if name_or_path not in configs:
        raise UsageError(f"unknown config {name_or_path!r}; named configs: {', '.join(sorted(configs))}")
    return configs[name_or_path]
