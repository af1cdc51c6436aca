"""A tiny random BLIP image-to-text model saved as a real transformers folder (config, safetensors,
processor and tokenizer files), loaded and run by the caption job's own code: beam search with
min/max length, the trigger word first; a folder transformers cannot read fails naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.core.failures import JobFailure

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "blue", "the", "on"]


def build_blip(folder: Path) -> Path:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    tokenizer.bos_token = "[CLS]"
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        text_config={"vocab_size": len(WORDS), "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                     "num_hidden_layers": 1, "encoder_hidden_size": 16, "bos_token_id": 2, "sep_token_id": 3,
                     "pad_token_id": 0, "max_position_embeddings": 64},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # random weights would mostly pick special tokens: favour the words
        model.text_decoder.cls.predictions.bias[[0, 1, 2, 4]] = -50.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_blip_folder_captions_a_dataset_with_beam_search(tmp_path):
    from trainer.job.caption_job import load_captioner
    from trainer.caption.captioning import caption_dataset
    from trainer.core.spec import CaptionSpec

    src = tmp_path / "src" / "2_thing"
    src.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(src / f"{i}.png")
    c = CaptionSpec(beam_search=True, num_beams=3, min_length=4, max_length=7, trigger_word="sks", batch_size=2)
    captioner = load_captioner(build_blip(tmp_path / "blip"), c)
    result = caption_dataset(str(tmp_path / "src"), str(tmp_path / "v2"), tagger=captioner)
    assert result.captions_written == 3
    for i in range(3):
        trigger, sentence = (tmp_path / "v2" / "2_thing" / f"{i}.txt").read_text().split(", ", 1)
        words = sentence.split()
        assert trigger == "sks" and 3 <= len(words) <= 6 and set(words) <= set(WORDS[5:]), sentence  # [CLS] counts


def test_a_folder_transformers_cannot_read_fails_naming_it(tmp_path):
    from trainer.job.caption_job import load_captioner
    from trainer.core.spec import CaptionSpec

    bad = tmp_path / "notamodel"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(JobFailure) as exc:
        load_captioner(bad, CaptionSpec())
    assert exc.value.reason.value == "model_invalid" and "notamodel" in exc.value.message
