"""The student a config describes: from the teacher's config with overrides, or an existing checkpoint."""

from __future__ import annotations

from tadistill.config import DistillConfig
from tadistill.errors import ConfigError
from tadistill.loading import check_same_vocabulary, load_pretrained, load_tokenizer
from tadistill.students.build import build_student, config_shape, student_config
from tadistill.students.calibration import calibration_batches
from tadistill.students.init import init_by_importance, init_from_teacher, select_layers


def build_student_from_spec(config: DistillConfig, teacher, tokenizer, *, head: str):
    """Build (or load) the student of ``config.student``; ``head`` is "base" or "mlm".

    Defaults: half the teacher's depth (DistilBERT), the teacher's width and heads, and an FFN that
    keeps the teacher's FFN-to-width ratio when the width changes.
    """
    sc = config.student
    if sc.pretrained:
        student = load_pretrained(sc.pretrained, head=head, trust_remote_code=config.trust_remote_code, what="student")
        own = load_tokenizer(sc.pretrained, trust_remote_code=config.trust_remote_code, what="student")
        check_same_vocabulary(tokenizer, own, sc.pretrained)
        return student
    shape = config_shape(teacher.config)
    # init_layers=all: every teacher block, so the student has the teacher's depth (DPHuBERT, WID and AutoDistil
    # start from a copy of the teacher and prune it).
    every = sc.init_layers == "all"
    layers = sc.num_layers or (shape.layers if every else max(1, shape.layers // 2))
    if every and layers != shape.layers:
        raise ConfigError(f"student.init_layers=all takes all {shape.layers} teacher blocks and student.num_layers="
                          f"{layers}: drop student.num_layers, or choose a layer selection such as uniform")
    hidden = sc.hidden_size or shape.hidden_size
    intermediate = sc.intermediate_size
    if intermediate is None and hidden != shape.hidden_size:
        intermediate = int(round(shape.intermediate_size * hidden / shape.hidden_size))
    cfg = student_config(
        teacher.config, num_layers=layers, hidden_size=hidden, num_heads=sc.num_heads, intermediate_size=intermediate
    )
    student = build_student(cfg, head=head)
    if sc.init in ("teacher", "importance"):
        explicit = sc.init_layers if isinstance(sc.init_layers, list) else None
        strategy = "explicit" if explicit is not None else ("first" if every else sc.init_layers)
        chosen = select_layers(strategy, layers, shape.layers, explicit)
        if sc.init == "teacher":
            init_from_teacher(student, teacher, chosen)
        else:
            positions = getattr(teacher.config, "max_position_embeddings", None)
            init_by_importance(student, teacher, chosen, calibration_batches(config, tokenizer, max_positions=positions))
    return student
