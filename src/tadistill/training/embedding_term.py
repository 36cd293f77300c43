"""The sentence-embedding term (kind ``embedding``): objectives/embedding.py on the last hidden states."""

from __future__ import annotations

from torch import nn

from tadistill import config as C
from tadistill.capture.architectures import Architecture
from tadistill.capture.hooks import CaptureRequest
from tadistill.objectives.embedding import embedding_cosine, embedding_mse, mean_pool
from tadistill.training.terms import Term


class SentenceEmbeddingTerm(Term):
    """MSE or cosine between W mean_pool(h_S) and mean_pool(h_T), last hidden states of both models.

    W is a learned linear map where the widths differ (as in HiddenStatesTerm), identity otherwise; it
    is applied after pooling, which equals pooling the projected tokens (objectives/embedding.py).
    """

    # One value per sequence: a sequence's embedding counts once, whatever its length.
    normalizer = "sequences"

    def __init__(self, cfg: C.SentenceEmbedding, student: Architecture, teacher: Architecture):
        super().__init__(cfg, student, teacher)
        # Index L is after the final norm where a model has one: the model's last_hidden_state (capture/hooks.py).
        self.s_layer, self.t_layer = student.num_layers, teacher.num_layers
        self.student_request = CaptureRequest(hidden=(self.s_layer,))
        self.teacher_request = CaptureRequest(hidden=(self.t_layer,))
        d_s, d_t = student.hidden_size, teacher.hidden_size
        self.projection = nn.Identity() if d_s == d_t else nn.Linear(d_s, d_t)

    def forward(self, student, teacher, batch):
        mask = batch["attention_mask"].bool()  # (B, T)
        e_s = self.projection(mean_pool(student.captured.hidden[self.s_layer], mask))  # (B, d_T)
        e_t = mean_pool(teacher.captured.hidden[self.t_layer], mask)  # (B, d_T)
        rows = mask.any(dim=1)  # (B,)
        distance = embedding_mse if self.cfg.loss == "mse" else embedding_cosine
        return distance(e_s, e_t, rows)
