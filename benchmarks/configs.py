"""Published config values of every network the benchmarks build at real size, one definition each,
each with the file it comes from: written out so that nothing is downloaded."""

# ---------------------------------------------------------------------------------------------
# CLIP towers (text encoders, image encoders, scorers)
# ---------------------------------------------------------------------------------------------

# openai/clip-vit-large-patch14: config.json text_config
# (= stabilityai/stable-diffusion-xl-base-1.0: text_encoder/config.json; FLUX.1-dev's text_encoder)
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
# openai/clip-vit-large-patch14: config.json vision_config (the XLabs FLUX IP-Adapter's encoder)
CLIP_L_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)
# stabilityai/stable-diffusion-xl-base-1.0: text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text)
CLIP_BIGG_TEXT = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
# yuvalkirstain/PickScore_v1: config.json text_config (= laion/CLIP-ViT-H-14-laion2B-s32B-b79K's;
# OpenCLIP ViT-bigG/14's text tower, narrower and shallower)
CLIP_H_TEXT = dict(
    CLIP_BIGG_TEXT,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    projection_dim=1024,
)
# h94/IP-Adapter: models/image_encoder/config.json (OpenCLIP ViT-H/14 vision, with projection;
# = yuvalkirstain/PickScore_v1: config.json vision_config)
CLIP_H_VISION = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
)
# openai/clip-vit-large-patch14 (clip-score scorer): config.json
CLIP_L14 = dict(text_config=CLIP_L_TEXT, vision_config=CLIP_L_VISION, projection_dim=768)
# yuvalkirstain/PickScore_v1 (pickscore scorer): config.json
CLIP_H14 = dict(text_config=CLIP_H_TEXT, vision_config=CLIP_H_VISION, projection_dim=1024)
# openai/clip-vit-base-patch32 (clip-b32 scorer): config.json (ViT-L/14's towers narrower, 32 px patches)
CLIP_B32 = dict(
    text_config=dict(
        CLIP_L_TEXT, hidden_size=512, intermediate_size=2048, num_attention_heads=8, projection_dim=512
    ),
    vision_config=dict(
        CLIP_L_VISION,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=32,
        projection_dim=512,
    ),
    projection_dim=512,
)
# open_clip src/open_clip/model_configs/ViT-H-14.json (HPS v2 and v2.1's architecture): embed_dim 1024;
# vision width 1280, 32 layers, head_width 80, patch 14, 224 px, MLP ratio 4; text width 1024, 24
# layers, 16 heads, context 77, vocabulary 49408
OPEN_CLIP_VIT_H14 = dict(
    embed_dim=1024,
    vision_width=1280,
    vision_layers=32,
    patch=14,
    image_size=224,
    text_width=1024,
    text_layers=24,
    context=77,
    vocab=49408,
)
CLIP_TEXT_TOKENS = 77  # the CLIP context: the most tokens a CLIP-type scorer's prompt has
IMAGEREWARD_TOKENS = 35  # ImageReward pads every prompt to 35 tokens (its max_length)
# Salesforce/blip-vqa-capfilt-large (blip-vqa scorer): config.json sets projection_dim 512,
# image_text_hidden_size 256, text_config num_attention_heads 12 (the default is 8) and vision_config
# dropout 0.0; every other value is transformers' BlipTextConfig / BlipVisionConfig default, written out
# here from transformers 5.24 (as seen in the config.json of copies saved from it by transformers 4.33 and
# 4.39, which hold exactly these keys). BLIP's ViT-B/16 at 384 px (its preprocessor_config.json resizes to
# 384 x 384), a BERT-base text encoder and decoder that cross-attend; vocabulary bert-base-uncased's
# 30522 + [DEC] + [ENC]. "capfilt-large" names the CapFilt-L training data, not a ViT-L.
BLIP_VQA = dict(
    text_config=dict(
        vocab_size=30524,
        hidden_size=768,
        encoder_hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=512,
    ),
    vision_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=384,
        patch_size=16,
    ),
    projection_dim=512,
    image_text_hidden_size=256,
)

# ---------------------------------------------------------------------------------------------
# SDXL
# ---------------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
# stabilityai/stable-diffusion-xl-base-1.0: vae/config.json (force_upcast: true)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
# h94/IP-Adapter: sdxl_models/ip-adapter-plus_sdxl_vit-h (shapes of its image_proj state dict)
# stabilityai/stable-diffusion-xl-base-1.0: scheduler/scheduler_config.json (EulerDiscreteScheduler)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    steps_offset=1,
)
SDXL_RESAMPLER = dict(embed_dims=1280, output_dims=2048, hidden_dims=1280, depth=4, dim_head=64, heads=20)
SDXL_IP_TOKENS = 16

# ---------------------------------------------------------------------------------------------
# FLUX.1-dev
# ---------------------------------------------------------------------------------------------

# black-forest-labs/FLUX.1-dev: transformer/config.json
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# black-forest-labs/FLUX.1-dev: text_encoder_2/config.json (google/t5-v1_1-xxl, encoder only)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
# black-forest-labs/FLUX.1-dev: vae/config.json
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# black-forest-labs/FLUX.1-dev: scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
FLUX_T5_TOKENS = 512  # FluxPipeline's max_sequence_length for FLUX.1-dev (T5 pads every prompt to it)
# XLabs-AI/flux-ip-adapter: ip_adapter.safetensors (image_proj 768 -> 4 x 4096; k/v 4096 -> 3072)
FLUX_IP_TOKENS = 4

# ---------------------------------------------------------------------------------------------
# LLaVA-1.5 (llava-hf/llava-1.5-{7b,13b}-hf: config.json)
# ---------------------------------------------------------------------------------------------

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336)
LLAVA_VISION = dict(CLIP_L_VISION, image_size=336)
# Vicuna-7B / 13B v1.5 (Llama-2 shapes), vocabulary 32000 + <image> + <pad>, padded to 32064
VICUNA = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
VICUNA_SHARED = dict(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001)
# the LlamaConfig values of each size's language model (no grouped-query attention)
LLAVA_TEXT = {
    size: dict(shape, **VICUNA_SHARED, num_key_value_heads=shape["num_attention_heads"])
    for size, shape in VICUNA.items()
}
# mlp2x_gelu projector on the second-to-last CLIP layer, CLS dropped: 576 image tokens
LLAVA = dict(
    image_token_id=32000,
    projector_hidden_act="gelu",
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
)
LLAVA_IMAGE_TOKENS = 576  # (336 / 14)^2, CLS dropped

# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL-7B
# ---------------------------------------------------------------------------------------------

# Qwen/Qwen2.5-VL-7B-Instruct: config.json
QWEN_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=128000,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=False,
)
QWEN_VISION = dict(
    depth=32,
    hidden_act="silu",
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
# Qwen/Qwen2.5-VL-7B-Instruct: preprocessor_config.json
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056

# ---------------------------------------------------------------------------------------------
# Published totals to check the builds against
# ---------------------------------------------------------------------------------------------

# The rounded totals of the model cards / hub pages, and for the aligner the exact count of the
# official checkpoint's state dict (see img-facts.md).
PUBLISHED_PARAMS = {
    "sdxl_unet": (2.567e9, "SDXL UNet (~2.567B)"),
    "flux_transformer": (11.9e9, "FLUX.1-dev transformer (~11.9B)"),
    "llava_13b": (13.35e9, "LLaVA-1.5-13B (~13.35B)"),
    "t5_xxl": (4.76e9, "T5 v1.1 XXL encoder (~4.76B)"),
    "qwen25vl_7b": (8.29e9, "Qwen2.5-VL-7B (~8.29B)"),
    "aligner_sdxl": (195_094_528, "aligner_sdxl.pth (exact)"),
    "aligner_flux": (675_401_728, "aligner_flux.pth (exact)"),
}
# LLaVA-1.5 per size (model cards' rounded totals)
LLAVA_PARAMS = {"7b": 7.06e9, "13b": PUBLISHED_PARAMS["llava_13b"][0]}
