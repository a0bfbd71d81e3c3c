"""Tiny random Hugging Face checkpoints written to disk, for the import, fine-tuning and export tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MARIAN_TEXTS = [
    "a man rides a bike down the street",
    "two dogs play in the snow",
    "the girl is reading a book",
    "ein mann fährt fahrrad auf der straße",
    "zwei hunde spielen im schnee",
    "das mädchen liest ein buch",
    "people are walking in the park",
    "menschen gehen im park spazieren",
] * 4


def perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Random noise on every weight: an initialisation's ones and zeros (LayerNorm) would hide a swap."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)


def write_marian_tokenizer(directory: Path) -> dict[str, int]:
    """SentencePiece models and a Marian vocab.json (</s> 0, <unk> 1, ..., <pad> last), saved through
    `transformers.MarianTokenizer` so the files are the ones Hugging Face writes."""
    import sentencepiece as spm
    from transformers import MarianTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(MARIAN_TEXTS),
        model_prefix=str(directory / "sp"),
        vocab_size=60,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_file=str(directory / "sp.model"))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = MarianTokenizer(
        str(directory / "sp.model"), str(directory / "sp.model"), str(directory / "vocab.json")
    )
    tokenizer.save_pretrained(str(directory))
    for name in ("sp.model", "sp.vocab"):
        (directory / name).unlink()
    return vocab


def write_marian(directory: Path, seed: int = 0, **overrides) -> Path:
    """A random MarianMTModel with its tokenizer; final_logits_bias random too (zero would map trivially)."""
    from transformers import MarianConfig, MarianMTModel

    vocab = write_marian_tokenizer(directory)
    values = dict(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=vocab["<pad>"],
        eos_token_id=0,
        decoder_start_token_id=vocab["<pad>"],
        activation_function="swish",
        scale_embedding=True,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    model = MarianMTModel(MarianConfig(**values)).eval()
    # Large enough weights that the output depends on the source (a near-uniform random model repeats one
    # token whatever it reads, which would leave beam search untested).
    perturb(model, 0.5)
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.2)
    model.save_pretrained(str(directory))
    return directory


def write_bert(directory: Path, seed: int = 0, vocab_txt_only: bool = False, **overrides) -> Path:
    """A random BertModel with a WordPiece tokenizer (tokenizer.json, or only vocab.txt)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = ["the", "a", "man", "dog", "cat", "runs", "fast", "slow", "is", "##s", "##ing", "good", "bad"]
    words += ["movie", "film", "really", "not"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *list("abcdefghijklmnopqrstuvwxyz.,!?"), *words]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if not vocab_txt_only:
        BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(str(directory))
    values = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**values)).eval()
    perturb(model)
    model.save_pretrained(str(directory))
    return directory
