"""Published configs of the components the full-size teacher families share (text encoders, VAEs), as
`(class name, config)` pairs: the values of each repository's config.json as published (fields left out take
the class defaults, which match the released models). The families' own tables (`teachers/<family>/
full_size.py`) combine them with their denoisers; `--dry-run` (onestep/dryrun.py) builds them on the meta
device. The parameter counts it prints are what such a build gives, nothing measured.
"""

CLIP_L = ("CLIPTextModel", dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
CLIP_L_PROJ = ("CLIPTextModelWithProjection", dict(CLIP_L[1], projection_dim=768))
OPENCLIP_H = ("CLIPTextModel", dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"))
OPENCLIP_BIGG_PROJ = ("CLIPTextModelWithProjection", dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                          num_hidden_layers=32, num_attention_heads=20,
                                                          max_position_embeddings=77, hidden_act="gelu",
                                                          projection_dim=1280))
T5_XXL = ("T5EncoderModel", dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=32))
GEMMA2_2B = ("Gemma2Model", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=256))
SD_VAE = ("AutoencoderKL", dict(in_channels=3, out_channels=3, latent_channels=4,
                                block_out_channels=(128, 256, 512, 512),
                                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512))
FLOW_VAE = ("AutoencoderKL", dict(SD_VAE[1], latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                  sample_size=1024))


__all__ = ["CLIP_L", "CLIP_L_PROJ", "FLOW_VAE", "GEMMA2_2B", "OPENCLIP_BIGG_PROJ", "OPENCLIP_H", "SD_VAE", "T5_XXL"]
