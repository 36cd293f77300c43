"""Chat data (issue 15 item 3): messages rendered with the chat template, only assistant turns distilled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tadistill.cli.main import main
from tadistill.data.chat import load_chat_turns, render_turn, tokenize_chat
from tadistill.data.prompts import load_pairs, tokenize_pairs
from tadistill.errors import ConfigError, DataError
from tadistill.training.loop import next_token_labels
from tadistill.training.sampling import sample_continuations

pytestmark = pytest.mark.usefixtures("one_thread")

# A small template of the usual shape: role markers, an end-of-turn token, a generation prompt.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CONVERSATIONS = [
    [{"role": "system", "content": "Small models are cheaper to run ."},
     {"role": "user", "content": "The quick brown fox jumps over the lazy dog"},
     {"role": "assistant", "content": "near the river bank ."},
     {"role": "user", "content": "A teacher model is distilled"},
     {"role": "assistant", "content": "into a smaller student without any labels ."}],
    [{"role": "user", "content": "Attention relations between queries and keys"},
     {"role": "assistant", "content": "carry much of the knowledge ."}],
    [{"role": "user", "content": "Hidden states of the student"},
     {"role": "assistant", "content": "are mapped to the layers of the teacher ."}],
    [{"role": "user", "content": "Python ships its documentation"},
     {"role": "assistant", "content": "with every installation of the interpreter ."}],
] * 4


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_gpt2) -> Path:
    """The tiny GPT-2's tokenizer with role markers, '<|end|>' as eos and a chat template; a model of its size."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-chat")
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.eos_token = "<|end|>"
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in records))
    return path


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return _write(tmp_path / "chat.jsonl", CONVERSATIONS)


def test_each_assistant_turn_is_one_sample_and_only_it_is_a_target(chat_model, chat_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    turns = load_pairs(str(chat_file), prompt_field="messages")
    assert len(turns) == 5 * 4  # 2 + 1 + 1 + 1 assistant turns per copy of the conversations
    assert turns[1].reply["content"] == "into a smaller student without any labels ."
    assert [m["role"] for m in turns[1].context] == ["system", "user", "assistant", "user"]
    splits = tokenize_pairs(turns, tok, max_length=48, heldout_fraction=0.25, seed=0)
    assert len(splits.train) + len(splits.heldout) == 20
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    end = tok.eos_token_id
    for part in (splits.train, splits.heldout):
        for i in range(len(part)):
            ids, p = part[i], part.prompt_length(i)
            assert ids[p - 1] == assistant  # the prompt ends with the generation prompt
            assert ids[-1] == end and (ids[p:-1] != end).all()  # the completion is one turn, ended by <|end|>
            completion = tok.decode(ids[p:])
            assert completion.startswith(("near", "into", "carry", "are", "with"))
            labels = next_token_labels(ids[None].long(), torch.ones(1, len(ids), dtype=torch.long), [p])[0]
            # Targets: exactly the tokens of the assistant turn (each predicted from the position before it).
            assert (labels != -100).nonzero().flatten().tolist() == list(range(p - 1, len(ids) - 1))
    # A conversation never straddles the split: its turns share their context's start.
    held = {tok.decode(splits.heldout[i][:12]) for i in range(len(splits.heldout))}
    train = {tok.decode(splits.train[i][:12]) for i in range(len(splits.train))}
    assert held and train and not held & train
    assert all(t.startswith("<|") for t in splits.heldout_texts)  # held-out texts are rendered conversations


def test_rendering_matches_the_template(chat_model, chat_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    turn = load_chat_turns(str(chat_file), "messages")[2]
    prompt, completion = render_turn(turn, tok)
    assert prompt == ("<|user|> Attention relations between queries and keys <|end|> <|assistant|> ")
    assert completion == "carry much of the knowledge . <|end|> "


def test_on_policy_samples_exactly_the_assistant_turn(chat_model, chat_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model)
    splits = tokenize_pairs(load_pairs(str(chat_file), prompt_field="messages"), tok, max_length=48,
                            heldout_fraction=0.25, seed=0)
    prompts = [splits.train[i][: splits.train.prompt_length(i)] for i in range(3)]
    out = sample_continuations(model, prompts, max_length=48, max_new_tokens=None, eos_id=tok.eos_token_id,
                               pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), temperature=1.0,
                               top_p=1.0)
    for prompt, seq in zip(prompts, out):
        assert torch.equal(seq[: len(prompt)], prompt.to(seq.dtype))  # sampling starts after the generation prompt
        assert len(seq) > len(prompt)
        ends = (seq[len(prompt):] == tok.eos_token_id).nonzero().flatten().tolist()
        assert ends in ([], [len(seq) - len(prompt) - 1])  # it stops at the end of the turn, or at max_length


def test_records_without_an_assistant_turn_are_refused(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [CONVERSATIONS[1], [{"role": "user", "content": "Hello there"}]])
    with pytest.raises(DataError, match=r"line 2 has no assistant turn") as info:
        load_pairs(str(bad), prompt_field="messages")
    assert "\n" not in str(info.value)
    wrong = _write(tmp_path / "wrong.jsonl", [[{"role": "user", "text": "no content key"}]])
    with pytest.raises(DataError, match="not {role: str, content: str}"):
        load_pairs(str(wrong), prompt_field="messages")


def test_a_tokenizer_without_a_template_is_refused(tiny_gpt2, chat_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    assert not tok.chat_template
    with pytest.raises(ConfigError, match="no chat template") as info:
        tokenize_chat(load_chat_turns(str(chat_file), "messages"), tok, max_length=48, heldout_fraction=0.25, seed=0)
    assert "\n" not in str(info.value)


def _args(teacher: Path, source: Path, tmp_path: Path, *extra: str) -> list[str]:
    sets = [f"teacher={teacher}", f"data.source={source}", "data.prompt_field=messages",
            f"data.cache_dir={tmp_path / 'cache'}", "data.max_length=48", "data.heldout_fraction=0.25",
            "train.steps=2", "train.batch_size=4", "train.eval_batches=1", "train.log_every=1",
            "student.num_layers=1", *extra]
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("recipe", ["kd", "gkd"])
def test_chat_runs_through_the_cli(recipe, chat_model, chat_file, tmp_path):
    out = tmp_path / recipe
    extra = ["data.prompt_tokens=null"] if recipe == "gkd" else []  # the recipe's plain-text prompts: not here
    assert main(["distill", recipe, *_args(chat_model, chat_file, tmp_path, *extra), "--out", str(out),
                 "--no-progress"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] > 0 for r in steps)
    if recipe == "gkd":
        assert steps[-1]["policy/student"] == 1.0  # every batch's assistant turns were sampled by the student
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "student").chat_template == TEMPLATE  # the student keeps it


def test_chat_without_a_template_is_one_line_through_the_cli(tiny_gpt2, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "kd", *_args(tiny_gpt2, chat_file, tmp_path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the teacher's tokenizer has no chat template") and "\n" not in err
    assert not out.exists()
