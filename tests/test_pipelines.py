"""Whole diffusers pipelines with vaecli inside: a tiny `StableVideoDiffusionPipeline` and a tiny `WanPipeline`,
built from small configs with random weights (nothing from the Hub: the text encoder is a tiny UMT5 from a config
and the prompt goes in as embeddings), run end to end with `output_type="np"` with and without `use_vaecli`: the
same frames. The SVD pipeline's image is encoded through vaecli too (`vae.encode`), then decoded as one clip."""

import numpy as np
import torch

from helpers import diffusers_model, random_vae, tiny_config
from vaecli.integrations.diffusers import use_vaecli

BOUND = 1e-4  # fp32 frames in [0, 1]
FRAMES = 4


def with_and_without(pipe, run):
    """The pipeline's frames without vaecli, then through it: (without, with, the handle)."""
    with torch.no_grad():
        want = np.asarray(run(pipe))
        with use_vaecli(pipe) as handle:
            got = np.asarray(run(pipe))
    assert want.std() > 0.01 and np.abs(got - want).max() <= BOUND
    return want, got, handle


def svd_pipeline():
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=8, projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32)
    scheduler = EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True, sigma_max=700.0,
                                       sigma_min=0.002, timestep_type="continuous", beta_schedule="scaled_linear")
    vision = CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, intermediate_size=37, patch_size=4)
    cfg = tiny_config("conv-only", ch_mult=(1, 2))
    vae = diffusers_model(cfg, random_vae(cfg, seed=4).state_dict())
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=CLIPVisionModelWithProjection(vision).eval(),
                                        unet=unet.eval(), scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_svd(pipe):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return pipe(image, height=32, width=32, num_frames=FRAMES, decode_chunk_size=FRAMES, num_inference_steps=2,
                min_guidance_scale=1.0, max_guidance_scale=1.0, output_type="np",
                generator=torch.Generator().manual_seed(2)).frames


def test_svd_pipeline_gives_the_same_frames_through_vaecli():
    pipe = svd_pipeline()
    want, got, handle = with_and_without(pipe, run_svd)
    assert want.shape == got.shape == (1, FRAMES, 32, 32, 3)
    stages = [stage for stage, _ in handle.calls]
    assert stages == ["encode", "decode"]  # the image, then the whole clip in one exact decode
    assert handle.calls[1][1].exact and "decode" not in pipe.vae.__dict__


def wan_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5Config, UMT5EncoderModel

    from test_wan import CONFIGS, pair

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    text = UMT5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4))
    vae = pair(CONFIGS["tiny"], seed=2)[1]
    pipe = WanPipeline(tokenizer=None, text_encoder=text.eval(), vae=vae, transformer=transformer.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_wan(pipe):
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3))
    return pipe(prompt_embeds=embeds, height=16, width=16, num_frames=9, num_inference_steps=2, guidance_scale=1.0,
                output_type="np", generator=torch.Generator().manual_seed(4)).frames


def test_wan_pipeline_gives_the_same_frames_through_vaecli():
    pipe = wan_pipeline()
    want, got, handle = with_and_without(pipe, run_wan)
    assert want.shape == got.shape == (1, 9, 16, 16, 3)
    assert [stage for stage, _ in handle.calls] == ["decode"] and handle.calls[0][1].exact
