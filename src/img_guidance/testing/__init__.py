"""Tiny random-weight models, tokenizers and data sets, built offline: what the tests and the benchmarks
run on (SDXL, FLUX, LLaVA, Qwen-VL, CLIP, ImageReward, ShapesWorld; Pick-a-Pic and InstructPix2Pix
parquet files). Nothing here downloads; none of the package's own modules import it."""
