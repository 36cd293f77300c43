"""The relation-MSE term (kind ``relation-mse``): objectives/relation_mse.py on the last blocks' Q, K and V.

AutoDistil's loss (Xu et al. 2022, sec. 3.2; docs/methods.md, AutoDistil). Any student can use it; a
weight-sharing method (``methods/autodistil.py``) sets ``widths`` while a sub-network runs, so that only the
columns of the heads it keeps are compared (the leading ones: a sub-network keeps the leftmost heads), re-split
into the same ``relation_heads`` as the whole model's.
"""

from __future__ import annotations

import torch

from tadistill import config as C
from tadistill.capture.architectures import Architecture
from tadistill.capture.hooks import CaptureRequest
from tadistill.objectives.relation_mse import relation_mse
from tadistill.training.terms import Term, require_relation_heads, resolve_teacher_layer


class RelationMSETerm(Term):
    """Q-Q, K-K, V-V relation MSE between the student's last block and the teacher's ``teacher_layer``."""

    def __init__(self, cfg: C.RelationMSE, student: Architecture, teacher: Architecture):
        super().__init__(cfg, student, teacher)
        self.t_layer = resolve_teacher_layer(cfg.teacher_layer, teacher.num_layers)
        self.s_layer = student.num_layers
        # AutoDistil re-splits every sub-network's relations into the teacher's head count.
        self.relation_heads = cfg.relation_heads or teacher.num_heads
        require_relation_heads(self.relation_heads, student, teacher,
                               setting="--set objectives.relation-mse.relation_heads")
        self.student_arch, self.teacher_arch = student, teacher
        self.student_request = CaptureRequest(qkv=(self.s_layer,))
        self.teacher_request = CaptureRequest(qkv=(self.t_layer,))
        # (Q width, K/V width) of the sub-network running now, or None: the student's whole width.
        self.widths: tuple[int, int] | None = None

    def forward(self, student, teacher, batch):
        mask = batch["attention_mask"].bool()  # (B, T)
        pick = {"qq": ("query", 0), "kk": ("key", 1), "vv": ("value", 1)}
        total = torch.zeros((), device=mask.device)
        for relation in self.cfg.relations:
            name, which = pick[relation]
            x_s = getattr(student.captured, name)[self.s_layer]  # (B, T, d_S)
            if self.widths is not None:
                x_s = x_s[..., :self.widths[which]]  # the kept heads' columns, (B, T, d_sub)
            x_t = getattr(teacher.captured, name)[self.t_layer]  # (B, T, d_T)
            total = total + relation_mse(x_s, x_t, mask, relation_heads=self.relation_heads, causal=self.causal)
        return total
