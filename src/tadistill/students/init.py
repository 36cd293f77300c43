"""Initialising a student from its teacher: which teacher blocks, and how to narrow their weights.

Depth: student block j takes the weights of teacher block ``layers[j]``; DistilBERT (Sanh et al.
2019) takes "one layer out of two", written as the list [0, 2, 4, 7, 9, 11] for 12 -> 6, which is
``select_layers("uniform", 6, 12)``.

Width: a narrower student keeps the leading rows and columns of every width dimension, and of the
attention projections the LEFTMOST HEADS (AutoDistil, Xu et al. 2022, section 3: a subnet takes the
leading hidden / MLP dimensions and the leftmost heads of the SuperLM). With Q/K/V of shape
(H * d_h, d) the features of head h are rows h * d_h .. h * d_h + d_h - 1, so a student with the
teacher's head_dim gets exactly the first H_S heads; a student with a smaller head_dim gets, for each
of its heads h < H_S, the leading d_h^S dims of teacher head h (rows h * d_h^T + j, j < d_h^S). The
attention output projection is sliced the same way on its input side. For RoPE models a smaller
head_dim also changes the rotary frequencies, so such a student only approximates its teacher's
attention; keep head_dim (fewer heads) when that matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from tadistill.capture.architectures import Architecture, get_module, resolve_architecture
from tadistill.errors import ConfigError, ModelError, did_you_mean
from tadistill.structure.activations import activation_scores
from tadistill.structure import Scores, TargetShape, check_target, materialize, resolve_layout, select_units

INIT_LAYER_STRATEGIES = ("first", "every-other", "uniform", "explicit")


def select_layers(
    strategy: str, num_student: int, num_teacher: int, explicit: list[int] | None = None
) -> list[int]:
    """Return the 0-based teacher block index that initialises each student block (length L_S).

    first: 0 .. L_S - 1 (truncation, as in teacher-free distillation). every-other: 0, 2, 4, ...
    uniform: round(linspace(0, L_T - 1, L_S)), rounding halves up, so 12 -> 6 gives DistilBERT's
    [0, 2, 4, 7, 9, 11]; first and last teacher blocks are always used when L_S > 1.
    explicit: ``explicit`` itself, checked for length L_S and range [0, L_T).

    Raises:
        ConfigError: unknown strategy, non-positive counts, a student deeper than the teacher, an
            every-other list that runs past the teacher, or a bad explicit list.
    """
    if strategy not in INIT_LAYER_STRATEGIES:
        raise ConfigError(
            f"unknown layer selection {strategy!r}{did_you_mean(strategy, INIT_LAYER_STRATEGIES)}: "
            f"use one of {', '.join(INIT_LAYER_STRATEGIES)}"
        )
    for name, value in (("student", num_student), ("teacher", num_teacher)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"the {name} layer count must be a positive integer, got {value!r}")
    if strategy == "explicit":
        return _check_explicit(explicit, num_student, num_teacher)
    if explicit is not None:
        raise ConfigError(
            f"an explicit layer list was given with strategy {strategy!r}: use strategy 'explicit' or drop the list"
        )
    if num_student > num_teacher:
        # The config spells an explicit selection as a list (student.init_layers=[...]), not as a strategy name.
        repeated = ",".join(str(j * num_teacher // num_student) for j in range(num_student))
        raise ConfigError(
            f"a {num_student}-layer student cannot take distinct blocks of a {num_teacher}-layer teacher: "
            f"use at most {num_teacher} student layers, or list the teacher blocks to repeat, e.g. "
            f"student.init_layers=[{repeated}]"
        )
    if strategy == "first":
        return list(range(num_student))
    if strategy == "every-other":
        if 2 * num_student - 1 > num_teacher:
            raise ConfigError(
                f"every-other needs a teacher of at least {2 * num_student - 1} layers for {num_student} "
                f"student layers, the teacher has {num_teacher}: use strategy 'uniform'"
            )
        return [2 * j for j in range(num_student)]
    if num_student == 1:
        return [0]  # linspace(0, L_T - 1, 1) = [0]
    # Integer arithmetic for floor(j (L_T - 1) / (L_S - 1) + 1/2): exact, no float ties.
    span, steps = num_teacher - 1, num_student - 1
    return [(2 * j * span + steps) // (2 * steps) for j in range(num_student)]


def _check_explicit(explicit: list[int] | None, num_student: int, num_teacher: int) -> list[int]:
    if explicit is None:
        raise ConfigError("strategy 'explicit' needs a list of teacher layers: give one index per student layer")
    layers = list(explicit)
    if len(layers) != num_student:
        raise ConfigError(
            f"the explicit layer list has {len(layers)} entries but the student has {num_student} layers: "
            "give one teacher layer per student layer"
        )
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_teacher:
            raise ConfigError(
                f"explicit teacher layer {index!r} is out of range: use 0-based indices from 0 to {num_teacher - 1}"
            )
    return layers


@dataclass
class InitReport:
    """What ``init_from_teacher`` did; tied tensors count once.

    copied: student tensors copied whole from the teacher. sliced: tensors cut to a narrower width.
    left_random: names of student tensors with no teacher counterpart, left as ``build_student`` drew
    them (e.g. the MLM head of a student whose teacher is a base model).
    """

    copied: int = 0
    sliced: int = 0
    left_random: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Side:
    """Where one model keeps its base model and blocks, for renaming tensors between models."""

    arch: Architecture
    base_prefix: str  # "" for a base model, "bert" for BertForMaskedLM, ...
    layers: str  # the block list relative to the base model, e.g. "encoder.layer"


def _side(model: PreTrainedModel) -> _Side:
    arch = resolve_architecture(model)
    base = model.base_model
    prefix = next(name for name, module in model.named_modules() if module is base)
    layers = arch.layers[len(prefix) + 1 :] if prefix and arch.layers.startswith(prefix + ".") else arch.layers
    return _Side(arch=arch, base_prefix=prefix, layers=layers)


# A tensor's name with the head/base prefix removed and its block index split off:
# ("base", block or None, name inside the block or the base model) or ("head", None, full name).
_Key = tuple[str, int | None, str]


def _key(name: str, side: _Side) -> _Key:
    if side.base_prefix:
        if not name.startswith(side.base_prefix + "."):
            return ("head", None, name)
        name = name[len(side.base_prefix) + 1 :]
    if name.startswith(side.layers + "."):
        index, _, rest = name[len(side.layers) + 1 :].partition(".")
        if index.isdigit():
            return ("base", int(index), rest)
    return ("base", None, name)


def init_from_teacher(student: PreTrainedModel, teacher: PreTrainedModel, layers: list[int]) -> InitReport:
    """Copy the teacher's weights into ``student`` in place; student block j <- teacher block layers[j].

    Tensors are matched by name, across a base model and a head model (a ``BertForMaskedLM`` student
    takes "bert.encoder..." from a ``BertModel`` teacher's "encoder..."). Equal shapes are copied;
    a narrower student is sliced (module docstring); GPT-2's fused Conv1D ``c_attn`` (weight
    (d, 3 d)) is sliced per q / k / v block and grouped-query K/V keep the leftmost KV heads.
    ``student.tie_weights()`` runs at the end. Works across devices and dtypes (``Tensor.copy_``).

    Raises:
        ConfigError: a different family, a bad ``layers`` list, or a student wider than the teacher.
    """
    s_side, t_side = _side(student), _side(teacher)
    if s_side.arch.family != t_side.arch.family:
        raise ConfigError(
            f"student family {s_side.arch.family!r} differs from teacher family {t_side.arch.family!r}: "
            "build the student with student_config(teacher.config)"
        )
    _check_explicit(list(layers), s_side.arch.num_layers, t_side.arch.num_layers)
    teacher_tensors = {_key(name, t_side): tensor for name, tensor in teacher.state_dict().items()}
    # Tied tensors (MLM decoder = word embeddings) appear under several names: fill each object once,
    # from the first alias that has a teacher counterpart.
    aliases: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, tensor in student.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), (tensor, []))[1].append(name)

    blocks = get_module(student, s_side.arch.layers)
    report = InitReport()
    with torch.no_grad():
        for tensor, names in aliases.values():
            for name in names:
                family, block, rest = _key(name, s_side)
                source = teacher_tensors.get((family, None if block is None else layers[block], rest))
                if source is not None:
                    break
            else:
                report.left_random.append(names[0])
                continue
            heads = _head_dims(blocks[block], rest, s_side.arch, t_side.arch) if block is not None else {}
            piece = _narrow(source, tuple(tensor.shape), heads, name)
            tensor.copy_(piece)
            if piece.shape == source.shape:
                report.copied += 1
            else:
                report.sliced += 1
    student.tie_weights()
    return report


def _head_dims(block: nn.Module, rest: str, s: Architecture, t: Architecture) -> dict[int, torch.Tensor]:
    """{dim: teacher indices} for the head-structured dimension of an attention tensor, else {}.

    ``rest`` is the tensor's name inside one block, e.g. "attention.self.query.weight".
    """
    path, _, kind = rest.rpartition(".")
    roles = {s.query: "q", s.key: "k", s.value: "v", s.fused_qkv: "qkv", s.attention_output: "o"}
    role = roles.get(path) if path else None
    if role is None or kind not in ("weight", "bias"):
        return {}
    # nn.Linear stores (out, in); transformers' Conv1D (GPT-2) stores the transpose, (in, out).
    out_dim, in_dim = (1, 0) if isinstance(get_module(block, path), Conv1D) else (0, 1)
    q_rows = _head_rows(s.num_heads, s.head_dim, t.num_heads, t.head_dim)
    kv_rows = _head_rows(s.num_kv_heads, s.head_dim, t.num_kv_heads, t.head_dim)
    if role == "o":
        # The output projection's bias lives on the hidden side: plain leading slice.
        return {in_dim: q_rows} if kind == "weight" else {}
    if role == "q":
        rows = q_rows
    elif role in ("k", "v"):
        rows = kv_rows
    else:
        # Fused [q | k | v] along the output features (GPT-2 c_attn): slice each block, then offset
        # the k and v picks by the teacher's q and q+k widths.
        q_width, kv_width = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        rows = torch.cat([q_rows, kv_rows + q_width, kv_rows + q_width + kv_width])
    return {out_dim if kind == "weight" else 0: rows}


def _head_rows(h_s: int, dh_s: int, h_t: int, dh_t: int) -> torch.Tensor:
    """Teacher feature indices h * dh_t + j for heads h < h_s and dims j < dh_s, shape (h_s * dh_s,)."""
    if h_s > h_t or dh_s > dh_t:
        raise ConfigError(
            f"the student has {h_s} attention heads of width {dh_s} but the teacher {h_t} of width {dh_t}: "
            "use at most the teacher's heads and head width"
        )
    return (torch.arange(h_s)[:, None] * dh_t + torch.arange(dh_s)[None, :]).reshape(-1)


def _narrow(source: torch.Tensor, shape: Sequence[int], heads: dict[int, torch.Tensor], name: str) -> torch.Tensor:
    """Cut ``source`` to ``shape``: leading entries on every dim, ``heads`` indices where given."""
    if source.dim() != len(shape):
        raise ModelError(
            f"student tensor {name} has shape {tuple(shape)} but the teacher's has {tuple(source.shape)}: "
            "build the student with student_config(teacher.config)"
        )
    for dim, size in enumerate(shape):
        if size > source.shape[dim]:
            raise ConfigError(
                f"student tensor {name} {tuple(shape)} is wider than the teacher's {tuple(source.shape)}: "
                "choose student sizes no larger than the teacher's"
            )
        if dim in heads:
            index = heads[dim].to(source.device)
            assert index.numel() == size, f"{name}: {index.numel()} head features for a dim of {size}"
            source = source.index_select(dim, index)
        elif size < source.shape[dim]:
            source = source.narrow(dim, 0, size)
    return source


def init_by_importance(
    student: PreTrainedModel, teacher: PreTrainedModel, layers: list[int], batches
) -> InitReport:
    """Like ``init_from_teacher``, but a narrower student keeps the teacher's MOST IMPORTANT units.

    Which units: Minitron's activation importance (Muralidharan et al. 2024, sec. 2.2; the scores of
    ``structure/activations.py`` over ``batches`` of (B, T) ``input_ids`` / ``attention_mask``): in every
    block of ``layers`` the attention heads with the largest output norms and the FFN units with the
    largest activations, and the hidden channels with the largest LayerNorm outputs. Leading rows and
    columns (``init_from_teacher``) keep channels picked by their index, which for a trained model is
    arbitrary: a 192-wide slice of the 384-wide built-in teacher starts near chance on retrieval
    (issue 18). Depth still follows ``layers`` (the student's ``init_layers``), not block importance,
    so ``init`` changes only how the width is narrowed.

    The student must keep the teacher's head width (fewer heads, not narrower ones): structured pruning
    keeps whole heads (``structure/``).

    Raises:
        ConfigError: ``layers`` not strictly increasing, a student head width other than the teacher's,
            or a shape the teacher cannot be pruned to.
    """
    layers = list(layers)
    if any(b <= a for a, b in pairwise(layers)):
        raise ConfigError(f"init=importance keeps distinct teacher blocks in order, got {layers}: use "
                          "student.init_layers=uniform (or an increasing list), or init=teacher")
    s_arch, layout = resolve_architecture(student), resolve_layout(teacher)
    if s_arch.head_dim != layout.head_dim:
        raise ConfigError(
            f"init=importance keeps whole teacher heads of width {layout.head_dim}, but the student's heads are "
            f"{s_arch.head_dim} wide: set student.num_heads={max(1, s_arch.hidden_size // layout.head_dim)}")
    target = TargetShape(num_layers=len(layers), hidden_size=s_arch.hidden_size, num_heads=s_arch.num_heads,
                         num_kv_heads=s_arch.num_kv_heads,
                         intermediate_size=getattr(student.config, layout.ffn_attribute))
    check_target(layout, target)
    scores = activation_scores(teacher, layout, batches)
    # Depth from ``layers``: a one-hot block score makes select_units keep exactly those blocks.
    chosen = torch.zeros(layout.num_layers)
    chosen[torch.as_tensor(layers, dtype=torch.long)] = 1.0
    masks = select_units(Scores(heads=scores.heads, ffn=scores.ffn, hidden=scores.hidden, blocks=chosen),
                         layout, target)
    pruned = materialize(teacher, layout, masks)  # teacher's class, the student's shape
    return init_from_teacher(student, pruned, list(range(len(layers))))
