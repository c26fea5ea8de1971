"""The math word problem solver's parts on the real pretrained MiniLM, single process (smoe_ds.finetuning.mwp_model)."""

from pathlib import Path

import pytest
import torch

from smoe_ds.finetuning.mwp_data import MalformedEquation, evaluate_prefix, read_problems
from smoe_ds.finetuning.mwp_model import IGNORE, EquationVocab, MathWordProblemModel, equation_targets, question_inputs

TINY = Path(__file__).resolve().parents[2] / "tests" / "data" / "mwp" / "tiny.csv"


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    from smoe_ds.hf.local_models import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir()), lambda: AutoModel.from_pretrained(minilm_dir())


def test_vocabulary_holds_operators_and_training_constants_and_slots_follow_it():
    problems = read_problems(TINY)
    vocab = EquationVocab.from_problems(problems)
    assert vocab.tokens == ("<start>", "+", "-", "*", "/", "2.0")
    encoded = vocab.encode(("+", "*", "number0", "number1", "2.0"))
    assert encoded == [1, 3, 6, 7, 5] and vocab.decode(encoded) == ["+", "*", "number0", "number1", "2.0"]
    assert vocab.encode(("+", "number0", "100.0")) is None  # a constant training never saw
    targets = equation_targets(vocab, problems[:2])
    assert targets.tolist() == [[1, 6, 7], [3, 6, 7]]
    assert equation_targets(vocab, [problems[0], problems[3]])[0].tolist() == [1, 6, 7, IGNORE, IGNORE]


def test_slot_positions_point_at_each_numbers_first_sub_word(minilm):
    tokenizer, _ = minilm
    problems = read_problems(TINY)
    inputs = question_inputs(tokenizer, [p.question for p in problems], 3, 64)
    for b, p in enumerate(problems):
        tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][b])
        for i in range(3):
            position = int(inputs["slot_positions"][b, i])
            assert (position >= 0) == (i < len(p.numbers))
            if position >= 0:
                assert tokens[position] == "number" and tokens[position + 1] == f"##{i}"
    short = question_inputs(tokenizer, [problems[3].question], 3, 8)  # truncation cuts number1, number2 off
    assert short["slot_positions"][0].tolist()[1:] == [-1, -1]


def test_greedy_decoding_always_writes_a_whole_prefix_expression_even_untrained(minilm):
    tokenizer, encoder = minilm
    torch.manual_seed(0)
    problems = read_problems(TINY)
    model = MathWordProblemModel(encoder(), EquationVocab.from_problems(problems)).eval()
    inputs = question_inputs(tokenizer, [p.question for p in problems], 3, 64)
    for max_tokens in (1, 3, 7):
        for equation, p in zip(model.solve(**inputs, max_tokens=max_tokens), problems):
            assert 1 <= len(equation) <= max_tokens
            assert all(not t.startswith("number") or int(t[6:]) < len(p.numbers) for t in equation)
            try:
                evaluate_prefix(equation, p.numbers)
            except MalformedEquation as e:
                assert "division by zero" in str(e)
