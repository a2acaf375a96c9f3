"""A tiny random BlipForQuestionAnswering folder with its BlipProcessor, laid out as
``Salesforce/blip-vqa-capfilt-large`` is: a BERT WordPiece tokenizer without BLIP's ``[DEC]`` and ``[ENC]``,
whose ids are the model vocabulary's last two (the decoder starts from ``[DEC]``, the config's
``bos_token_id``), and "yes" and "no" as whole words, as bert-base-uncased has them."""

from __future__ import annotations

from pathlib import Path

from img_guidance.testing.tokenizers import bert_tokenizer

IMAGE_SIZE = 30  # 5 x 5 patches of 6 px
WEIGHT_SCALE = 0.3  # random weights large enough that P(yes) moves far from 1/2 between questions


def blip_vqa_tokenizer():
    """:func:`~img_guidance.testing.tokenizers.bert_tokenizer` with "yes" and "no" added to its
    vocabulary as whole words (so "eyes" or "snow" still tokenize letter by letter)."""
    from transformers import BertTokenizer

    vocab = dict(bert_tokenizer().get_vocab())
    for word in ("yes", "no"):
        vocab[word] = len(vocab)
    return BertTokenizer(vocab=vocab, model_max_length=512)


def make_tiny_blip_vqa(folder: Path, *, seed: int = 0) -> Path:
    """Write a BlipForQuestionAnswering (width 32, 2 layers per tower, 30 px images) with random
    weights of scale :data:`WEIGHT_SCALE` (LayerNorms at 1 + noise) and a BlipProcessor resizing to
    30 x 30 to ``folder``; returns it."""
    import torch
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessorPil, BlipProcessor

    tokenizer = blip_vqa_tokenizer()
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer) + 2,  # + [DEC], [ENC]
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=len(tokenizer),  # [DEC]
            pad_token_id=tokenizer.pad_token_id,
            sep_token_id=tokenizer.sep_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=6,
        ),
    )
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # tied decoder/embedding weights come once
            noise = torch.randn(parameter.shape, generator=generator) * WEIGHT_SCALE
            is_norm_gain = parameter.dim() == 1 and "norm" in name.lower() and name.endswith("weight")
            parameter.copy_(1 + noise if is_norm_gain else noise)
    model.save_pretrained(folder)
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder
