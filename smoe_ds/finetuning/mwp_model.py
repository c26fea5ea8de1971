"""A math word problem solver: a pretrained encoder and a small decoder that writes the prefix equation.

The encoder (a BERT-family model, converted to SMoE-Dropout or not) reads the question, whose
numbers are the words ``number0``, ``number1``, .... The decoder is a GRU with dot-product
attention over the encoder's states; at each step it scores two kinds of output token:

- the fixed vocabulary (``EquationVocab``): the operators and the constants seen in training;
- the problem's number slots, by copying: slot i's score is the decoder's state against the
  encoder's state at the first sub-word of ``numberI``, so numbers are never generated as digits.

Training is teacher-forced cross-entropy over both kinds at once. Decoding is greedy, and keeps
the output a complete prefix expression: it tracks how many operands are still owed, stops when
none are, and allows an operator only while the length budget can still close it.

Shape legend: B problems, L question tokens, H the encoder's hidden size, M number slots (the
most numbers of any problem in the batch), T equation tokens, V the fixed vocabulary, V + M the
decoder's scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from smoe_ds.finetuning.mwp_data import OPERATORS, SLOT, Problem

IGNORE = -100  # target padding, as torch's cross-entropy ignores it


@dataclass(frozen=True)
class EquationVocab:
    """The decoder's fixed output tokens: the start token, the operators, then the constants.

    A slot ``numberI`` is output index ``len(tokens) + I``.
    """

    constants: tuple[str, ...]

    START = "<start>"

    @classmethod
    def from_problems(cls, problems: list[Problem]) -> EquationVocab:
        """The constants of the training equations (a constant seen only in evaluation cannot be written)."""
        found = {t for p in problems for t in p.equation if t not in OPERATORS and not SLOT.match(t)}
        return cls(tuple(sorted(found, key=float)))

    @property
    def tokens(self) -> tuple[str, ...]:
        return (self.START, *OPERATORS, *self.constants)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, equation: tuple[str, ...]) -> list[int] | None:
        """Output indices of an equation; None if it uses a constant outside the vocabulary."""
        index = {t: i for i, t in enumerate(self.tokens)}
        out = []
        for token in equation:
            slot = SLOT.match(token)
            if slot:
                out.append(len(self) + int(slot.group(1)))
            elif token in index and token != self.START:
                out.append(index[token])
            else:
                return None
        return out

    def decode(self, indices: list[int]) -> list[str]:
        return [self.tokens[i] if i < len(self) else f"number{i - len(self)}" for i in indices]

    def is_operator(self, index: int) -> bool:
        return 1 <= index <= len(OPERATORS)


class EquationDecoder(nn.Module):
    """GRU decoder with attention and slot copying (see the module's docstring); width H."""

    def __init__(self, hidden: int, vocab: EquationVocab) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(len(vocab), hidden)
        self.slot_input = nn.Linear(hidden, hidden)  # a copied slot's encoder state as the next input
        self.start_state = nn.Linear(hidden, hidden)
        self.cell = nn.GRUCell(2 * hidden, hidden)
        self.attend = nn.Linear(hidden, hidden, bias=False)
        self.fixed_scores = nn.Linear(2 * hidden, len(vocab))
        self.slot_query = nn.Linear(2 * hidden, hidden)

    def start(self, enc_BLH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first state (from the encoder's first token) and the start token's input."""
        B = enc_BLH.shape[0]
        start = self.embed(torch.zeros(B, dtype=torch.long, device=enc_BLH.device))
        return torch.tanh(self.start_state(enc_BLH[:, 0])), start

    def step(self, h_BH, input_BH, context_BH, enc_BLH, enc_mask_BL, slots_BMH, slot_mask_BM):
        """One decoding step -> (new state, new context, scores [B, V + M])."""
        h_BH = self.cell(torch.cat([input_BH, context_BH], dim=-1), h_BH)
        attn_BL = torch.einsum("blh,bh->bl", enc_BLH, self.attend(h_BH)).masked_fill(~enc_mask_BL, float("-inf"))
        context_BH = torch.einsum("bl,blh->bh", attn_BL.softmax(-1), enc_BLH)
        feature = torch.cat([h_BH, context_BH], dim=-1)
        fixed_BV = self.fixed_scores(feature)
        fixed_BV[:, 0] = float("-inf")  # the start token is never written
        slot_BM = torch.einsum("bmh,bh->bm", slots_BMH, self.slot_query(feature)).masked_fill(
            ~slot_mask_BM, float("-inf")
        )
        return h_BH, context_BH, torch.cat([fixed_BV, slot_BM], dim=-1)

    def input_of(self, index_B: torch.Tensor, slots_BMH: torch.Tensor) -> torch.Tensor:
        """The next step's input for output indices [B]: a fixed token's embedding or a slot's state."""
        V = len(self.vocab)
        fixed = self.embed(index_B.clamp(max=V - 1))
        slot = slots_BMH[torch.arange(len(index_B)), (index_B - V).clamp(min=0)]
        return torch.where((index_B >= V).unsqueeze(-1), self.slot_input(slot), fixed)


@dataclass
class SolverOutput:
    loss: torch.Tensor  # scalar: what the fine-tuning loop backpropagates and logs


class MathWordProblemModel(nn.Module):
    """encoder + ``EquationDecoder``. ``forward`` returns the teacher-forced loss; ``solve`` decodes."""

    def __init__(self, encoder: nn.Module, vocab: EquationVocab) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = EquationDecoder(encoder.config.hidden_size, vocab)

    def _encode(self, input_ids, attention_mask, slot_positions_BM):
        enc_BLH = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        slot_mask_BM = slot_positions_BM >= 0
        B = enc_BLH.shape[0]
        slots_BMH = enc_BLH[torch.arange(B).unsqueeze(-1), slot_positions_BM.clamp(min=0)]
        return enc_BLH, attention_mask.bool(), slots_BMH, slot_mask_BM

    def forward(self, input_ids, attention_mask, slot_positions, targets) -> SolverOutput:
        """Mean cross-entropy of the equations ``targets`` [B, T] (output indices, IGNORE-padded)."""
        enc, enc_mask, slots, slot_mask = self._encode(input_ids, attention_mask, slot_positions)
        h, inputs = self.decoder.start(enc)
        context = torch.zeros_like(h)
        scores = []
        for t in range(targets.shape[1]):
            h, context, s = self.decoder.step(h, inputs, context, enc, enc_mask, slots, slot_mask)
            scores.append(s)
            inputs = self.decoder.input_of(targets[:, t].clamp(min=0), slots)
        scores_BTK = torch.stack(scores, dim=1)
        return SolverOutput(F.cross_entropy(scores_BTK.flatten(0, 1), targets.flatten(), ignore_index=IGNORE))

    @torch.no_grad()
    def solve(self, input_ids, attention_mask, slot_positions, max_tokens: int = 15) -> list[list[str]]:
        """Greedy decoding, kept a well-formed prefix expression of at most ``max_tokens`` tokens."""
        enc, enc_mask, slots, slot_mask = self._encode(input_ids, attention_mask, slot_positions)
        vocab, B = self.decoder.vocab, enc.shape[0]
        h, inputs = self.decoder.start(enc)
        context = torch.zeros_like(h)
        owed = torch.ones(B, dtype=torch.long, device=enc.device)  # operands still needed
        out = [[] for _ in range(B)]
        operators = torch.zeros(len(vocab) + slots.shape[1], dtype=torch.bool, device=enc.device)
        operators[1 : 1 + len(OPERATORS)] = True
        for t in range(max_tokens):
            h, context, s = self.decoder.step(h, inputs, context, enc, enc_mask, slots, slot_mask)
            # an operator adds an owed operand: allowed only while the remaining budget can pay it
            closing = (owed + 1 > max_tokens - t - 1).unsqueeze(-1)
            choice = s.masked_fill(closing & operators, float("-inf")).argmax(-1)
            for b in range(B):
                if owed[b] > 0:
                    out[b].append(int(choice[b]))
            owed = torch.where(owed > 0, owed + torch.where(operators[choice], 1, -1), owed)
            if not (owed > 0).any():
                break
            inputs = self.decoder.input_of(choice, slots)
        return [vocab.decode(seq) for seq in out]


def question_inputs(tokenizer, questions: list[str], max_slots: int, max_length: int) -> dict:
    """Tokenise questions (words split on spaces) -> input_ids, attention_mask [B, L] and
    slot_positions [B, max_slots]: the first sub-word of each ``numberI`` word, -1 where the problem
    has no slot I or truncation cut it off."""
    words = [q.split() for q in questions]
    enc = tokenizer(
        words, is_split_into_words=True, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    positions = torch.full((len(words), max(1, max_slots)), -1, dtype=torch.long)
    for b, ws in enumerate(words):
        seen = set()
        for position, word in enumerate(enc.word_ids(b)):
            if word is None or word in seen:
                continue
            seen.add(word)
            slot = SLOT.match(ws[word])
            if slot and int(slot.group(1)) < positions.shape[1]:
                positions[b, int(slot.group(1))] = position
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "slot_positions": positions}


def equation_targets(vocab: EquationVocab, problems: list[Problem]) -> torch.Tensor:
    """[B, T] output indices of each problem's equation, IGNORE-padded; a problem whose equation
    uses an unknown constant gets no target (all IGNORE)."""
    encoded = [vocab.encode(p.equation) or [] for p in problems]
    targets = torch.full((len(problems), max(1, max(len(e) for e in encoded))), IGNORE, dtype=torch.long)
    for b, e in enumerate(encoded):
        targets[b, : len(e)] = torch.tensor(e, dtype=torch.long)
    return targets


SOLVER_CONFIG = "solver.json"
SOLVER_WEIGHTS = "solver.safetensors"


def save_solver(model: MathWordProblemModel, settings: dict, out: Path) -> None:
    """Beside the encoder's Hugging Face files in ``out``: the decoder's weights and what rebuilds it
    (the vocabulary's constants and ``settings``: max_slots, max_length, max_tokens)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.decoder.state_dict().items()}
    save_file(state, out / SOLVER_WEIGHTS)
    config = {"constants": list(model.decoder.vocab.constants), **settings}
    (out / SOLVER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_solver(path: str | Path) -> tuple[MathWordProblemModel, dict]:
    """A solver exported by ``smoe_ds.finetune`` (hf.task math_word_problem) on one device, and its
    settings. The encoder loads through transformers' AutoModel (after ``import smoe_ds`` for an
    SMoE-Dropout one, which then takes ``set_active_experts``)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    import smoe_ds  # noqa: F401  (registers the SMoE-Dropout model type with the Auto classes)

    path = Path(path)
    settings = json.loads((path / SOLVER_CONFIG).read_text())
    vocab = EquationVocab(tuple(settings.pop("constants")))
    model = MathWordProblemModel(AutoModel.from_pretrained(path), vocab)
    model.decoder.load_state_dict(load_file(path / SOLVER_WEIGHTS))
    return model.eval(), settings
