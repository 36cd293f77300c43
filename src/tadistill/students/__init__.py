"""Students: configs derived from a teacher, random construction, and initialisation from the teacher."""

from __future__ import annotations

from tadistill.students.build import (
    GATED_MLP_FAMILIES,
    STUDENT_HEADS,
    ConfigShape,
    build_student,
    config_shape,
    student_config,
)
from tadistill.students.init import INIT_LAYER_STRATEGIES, InitReport, init_from_teacher, select_layers

__all__ = [
    "GATED_MLP_FAMILIES",
    "INIT_LAYER_STRATEGIES",
    "STUDENT_HEADS",
    "ConfigShape",
    "InitReport",
    "build_student",
    "config_shape",
    "init_from_teacher",
    "select_layers",
    "student_config",
]
