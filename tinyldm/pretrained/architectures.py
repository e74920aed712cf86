"""The three releases' block structure in diffusers' config names, at full size, read off CompVis'
configs.

    celebahq-ldm-vq-4.yaml / models/ldm/celeba256   CompVis/ldm-celebahq-256
    models/ldm/bsr_sr/config.yaml                   CompVis/ldm-super-resolution-4x-openimages
    txt2img-1p4B-eval.yaml                          CompVis/ldm-text2im-large-256

CompVis' `attention_resolutions` are downsampling factors (1 = the first level), `num_head_channels`
a head width and `num_heads` a head count; diffusers' UNet2DModel takes a head width
(`attention_head_dim`), UNet2DConditionModel a head count (under the same name). The GroupNorm eps
of the released ResBlocks is 1e-5.

These dicts build the released shapes with random weights (the parity tests, `python -m
tinyldm.tools.bench_pretrained` and the released-models notebook), so that size, memory and time are
known without the weights; `load()` reads the real folders' own config.json files, not these.
"""

from __future__ import annotations

# vq-f4 (both LDM-4 releases): ch 128, ch_mult 1,2,4, 2 ResBlocks, z 3, 8192 codes
VQ_F4 = dict(block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, latent_channels=3,
             vq_embed_dim=3, num_vq_embeddings=8192)

RELEASED = {
    "CompVis/ldm-celebahq-256": {
        # model_channels 224, channel_mult 1,2,3,4, attention at factors 2, 4, 8, head width 32;
        # 64 x 64 x 3 latents
        "unet": dict(sample_size=64, in_channels=3, out_channels=3,
                     block_out_channels=(224, 448, 672, 896),
                     layers_per_block=2, attention_head_dim=32, norm_eps=1e-5,
                     down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                       "AttnDownBlock2D"),
                     up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                                     "UpBlock2D")),
        "vqvae": VQ_F4,
        "image_size": 256,
    },
    "CompVis/ldm-super-resolution-4x-openimages": {
        # model_channels 160, channel_mult 1,2,2,4, attention at factor 8 only (16 is no level),
        # head width 32; z_t (3 channels) and the low-resolution image (3) stacked at the input
        "unet": dict(sample_size=64, in_channels=6, out_channels=3,
                     block_out_channels=(160, 320, 320, 640),
                     layers_per_block=2, attention_head_dim=32, norm_eps=1e-5,
                     down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D",
                                       "AttnDownBlock2D"),
                     up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")),
        "vqvae": VQ_F4,
        "image_size": 256,  # from a 64 x 64 input; any size (the UNet is convolutional)
    },
    "CompVis/ldm-text2im-large-256": {
        # model_channels 320, channel_mult 1,2,4,4, transformer blocks at factors 1, 2, 4, 8 heads
        # each, cross-attention to 1280-wide LDMBert tokens; 32 x 32 x 4 latents
        "unet": dict(sample_size=32, in_channels=4, out_channels=4,
                     block_out_channels=(320, 640, 1280, 1280),
                     layers_per_block=2, attention_head_dim=8, cross_attention_dim=1280,
                     norm_eps=1e-5,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        # kl-f8: ch 128, ch_mult 1,2,4,4, 2 ResBlocks, z 4
        "vqvae": dict(block_out_channels=(128, 256, 512, 512),
                      down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                      latent_channels=4),
        # BERTEmbedder n_embed 1280, n_layer 32 (x-transformers' defaults: 8 heads of 64, MLP x4),
        # 77 tokens
        "bert": dict(vocab_size=30522, max_position_embeddings=77, d_model=1280, encoder_layers=32,
                     encoder_attention_heads=8, head_dim=64, encoder_ffn_dim=5120),
        "image_size": 256,
    },
}
