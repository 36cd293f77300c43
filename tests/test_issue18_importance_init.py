"""student.init=importance (issue 18): a narrow student keeps the teacher's most active units, not the leading ones."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from tadistill.errors import ConfigError
from tadistill.students import build_student, init_from_teacher, student_config
from tadistill.students.init import init_by_importance

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 60


def bert_config(**kw) -> tf.BertConfig:
    base = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 64, "pad_token_id": 3, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}
    return tf.BertConfig(**{**base, **kw})


def built(config, head: str = "base", seed: int = 0):
    torch.manual_seed(seed)
    return build_student(config, head=head).eval()


def batches(n: int = 2):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(4, VOCAB, (3, 10), generator=g)
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[0, 7:] = 0
        yield {"input_ids": ids, "attention_mask": mask}


def quiet_leading_channels(teacher, count: int) -> None:
    """Scale down the first ``count`` hidden channels at every LayerNorm: the least active channels."""
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[:count] *= 0.01
                module.bias[:count] *= 0.01


def test_narrow_student_keeps_the_active_hidden_channels_where_slicing_keeps_the_leading_ones() -> None:
    teacher = built(bert_config())
    quiet_leading_channels(teacher, 16)
    narrow = student_config(bert_config(), num_layers=2, hidden_size=16, num_heads=2, intermediate_size=40)
    by_importance, by_index = built(narrow, seed=1), built(narrow, seed=1)
    report = init_by_importance(by_importance, teacher, [1, 3], batches())
    init_from_teacher(by_index, teacher, [1, 3])
    assert report.left_random == [] and report.copied > 0
    t_norm = teacher.embeddings.LayerNorm.weight
    # Channels 16..31 carry the activations: importance keeps them, leading slices keep the quiet ones.
    assert torch.equal(by_importance.embeddings.LayerNorm.weight, t_norm[16:])
    assert torch.equal(by_index.embeddings.LayerNorm.weight, t_norm[:16])
    assert torch.equal(by_importance.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight[:, 16:])
    # Depth follows the requested blocks: student block 1 is teacher block 3 (its FFN input columns are the kept channels).
    s_ffn, t_ffn = by_importance.encoder.layer[1].intermediate.dense.weight, teacher.encoder.layer[3].intermediate.dense.weight
    assert all(any(torch.equal(row, t_row[16:]) for t_row in t_ffn) for row in s_ffn)


def test_full_width_importance_init_equals_copying_the_blocks() -> None:
    teacher = built(bert_config())
    shallow = student_config(bert_config(), num_layers=2)
    a, b = built(shallow, seed=1), built(shallow, seed=2)
    init_by_importance(a, teacher, [0, 3], batches())
    init_from_teacher(b, teacher, [0, 3])
    ids = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).last_hidden_state, b(input_ids=ids).last_hidden_state)


def test_mlm_student_from_base_teacher() -> None:
    teacher = built(bert_config())
    student = built(student_config(bert_config(), num_layers=2, hidden_size=16, num_heads=2), head="mlm", seed=1)
    report = init_by_importance(student, teacher, [0, 2], batches())
    assert report.left_random and all("cls" in name for name in report.left_random)  # the MLM head has no source


def test_importance_init_errors() -> None:
    teacher = built(bert_config())  # 4 heads of width 8
    narrower_heads = built(student_config(bert_config(), num_layers=2, hidden_size=16, num_heads=4))  # width 4
    with pytest.raises(ConfigError, match="student.num_heads=2"):
        init_by_importance(narrower_heads, teacher, [0, 1], batches())
    student = built(student_config(bert_config(), num_layers=2, hidden_size=16, num_heads=2))
    with pytest.raises(ConfigError, match="increasing"):
        init_by_importance(student, teacher, [2, 1], batches())


def test_config_accepts_importance_and_cli_builds_the_student(tiny_encoder, tiny_args, tmp_path) -> None:
    from tadistill.cli.main import main

    out = tmp_path / "run"
    code = main(["distill", "minilmv2", *tiny_args("student.num_layers=2", "student.hidden_size=16",
                                                   "student.num_heads=2", "student.init=importance",
                                                   "objectives.minilmv2.relation_heads=2", teacher=tiny_encoder),
                 "--out", str(out), "--no-progress"])
    assert code == 0
    student = tf.AutoModel.from_pretrained(out / "student")
    assert student.config.hidden_size == 16 and student.config.num_hidden_layers == 2
