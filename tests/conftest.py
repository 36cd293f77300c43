"""Shared fixtures: a tiny BERT teacher (with and without an MLM head), its tokenizer, a small corpus.

Everything is built locally from configs and a vocabulary written here: tests never reach a hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A teacher model is distilled into a smaller student without any labels.",
    "Attention relations between queries and keys carry much of the knowledge.",
    "Hidden states of the student are mapped to the layers of the teacher.",
    "Python ships its documentation with every installation of the interpreter.",
    "Small models are cheaper to run and easier to deploy on a laptop.",
    "The student keeps most of what the teacher knows at a fraction of the cost.",
    "Layer mappings decide which teacher layer each student layer should imitate.",
] * 6


def _vocab() -> list[str]:
    words = sorted({w for t in TEXTS for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    chars = sorted({c for w in words for c in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *chars, *[f"##{c}" for c in chars]]
    return list(dict.fromkeys(tokens))  # one-letter words are also characters


def _write_tokenizer(folder: Path):
    """A WordPiece tokenizer over the words of TEXTS (plus characters), saved to ``folder``."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    # transformers 5 ignores BertTokenizerFast(vocab_file=...); loading the folder works in 4 and 5.
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == len(_vocab()), "the tiny vocabulary was not loaded"
    tok.save_pretrained(folder)
    return tok


def make_tiny_bert(
    folder: Path, *, mlm_head: bool = True, layers: int = 4, hidden: int = 32, heads: int = 4, dropout: float = 0.1
) -> Path:
    """Save a tiny random BERT and its tokenizer to ``folder``; return the folder."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    tok = _write_tokenizer(folder)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    model = (BertForMaskedLM if mlm_head else BertModel)(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The WordPiece tokenizer of the tiny models (real words of TEXTS, not [UNK])."""
    return _write_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and 2 threads on a busy 2-core box crawl.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the thread count is restored.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 4x32 BERT with an MLM head."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-mlm"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 4x32 BERT without an MLM head (like the built-in sentence encoder)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-base"), mlm_head=False)


@pytest.fixture(scope="session")
def tiny_teacher_no_dropout(tmp_path_factory) -> Path:
    """A 4x32 BERT with an MLM head and no dropout (for exact equality of two training schedules)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(f"{t} Paragraph {i}." for i, t in enumerate(TEXTS)) + "\n")
    return path


@pytest.fixture
def tiny_args(tiny_teacher, tiny_corpus, tmp_path):
    """--set overrides that make any recipe run in a second or two on the tiny teacher."""

    def build(*extra: str, teacher: Path | None = None) -> list[str]:
        sets = [
            f"teacher={teacher or tiny_teacher}",
            f"data.source={tiny_corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=24",
            "data.heldout_fraction=0.2",
            "train.steps=2",
            "train.batch_size=4",
            "train.eval_batches=1",
            "train.log_every=1",
            *extra,
        ]
        return [a for s in sets for a in ("--set", s)]

    return build


def _write_causal_tokenizer(folder: Path):
    """A GPT-2-style word-level tokenizer over TEXTS with '<|endoftext|>' as eos, bos and pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in TEXTS for w in re.findall(r"\w+|[^\w\s]", t)})
    vocab = {tok: i for i, tok in enumerate(["<|endoftext|>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<unk>")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return tok


def make_tiny_causal(folder: Path, *, family: str = "gpt2", layers: int = 4, hidden: int = 32, heads: int = 4,
                     dropout: float = 0.0) -> Path:
    """Save a tiny random GPT-2 or Llama causal LM and its tokenizer to ``folder``; return the folder."""
    import transformers as tf

    tok = _write_causal_tokenizer(folder)
    common = {"vocab_size": len(tok), "bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.eos_token_id}
    if family == "gpt2":
        config = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64, resid_pdrop=dropout,
                               embd_pdrop=dropout, attn_pdrop=dropout, **common)
        cls = tf.GPT2LMHeadModel
    else:
        config = tf.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                num_key_value_heads=heads // 2, intermediate_size=2 * hidden,
                                max_position_embeddings=64, tie_word_embeddings=False, **common)
        cls = tf.LlamaForCausalLM
    torch.manual_seed(0)
    cls(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_causal(tmp_path_factory.mktemp("tiny-gpt2"), family="gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_causal(tmp_path_factory.mktemp("tiny-llama"), family="llama")
