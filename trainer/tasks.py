"""Verifiable toy tasks for RL on a small token vocabulary: each draws prompts and scores a completion with a
plain Python function (the reward is recomputed from the prompt, never looked up).

Vocabulary (48 ids, shared by all tasks): 0 PAD, 1 BOS, 2 EOS, 3 "=", 4 "+", 5-14 the digits 0-9, 15-40 the
letters a-z, the rest unused. A prompt is BOS, the question, "="; a correct completion is the answer followed
by EOS, and nothing else. The reward is 1.0 for a correct completion and 0.0 otherwise (a completion that runs
on past its EOS, or never emits it, is wrong).

    task = make_task("reverse", min_len=3, max_len=6, alphabet=8)
    prompt, answer = task.sample(random.Random(0))    # answer ends with EOS: the supervised target
    task.reward(prompt, completion)                   # 1.0 or 0.0
"""

import dataclasses
import random

PAD, BOS, EOS, SEP, PLUS = 0, 1, 2, 3, 4
DIGIT0, LETTER_A = 5, 15
VOCAB_SIZE = 48


def decode(ids) -> str:
    """Readable text of token ids (for logs and docs)."""
    special = {PAD: "_", BOS: "^", EOS: "$", SEP: "=", PLUS: "+"}
    out = []
    for t in ids:
        t = int(t)
        if t in special:
            out.append(special[t])
        elif DIGIT0 <= t < DIGIT0 + 10:
            out.append(str(t - DIGIT0))
        elif LETTER_A <= t < LETTER_A + 26:
            out.append(chr(ord("a") + t - LETTER_A))
        else:
            out.append(f"<{t}>")
    return "".join(out)


def _check_int(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


class Task:
    """A verifiable task: `sample(rng) -> (prompt, answer)`, `answer_of(prompt)`, `reward(prompt, completion)`."""

    name = "task"
    vocab_size = VOCAB_SIZE
    eos_token_id = EOS

    def question(self, rng: random.Random) -> list:
        raise NotImplementedError

    def answer_of(self, prompt) -> list:
        """The correct completion of `prompt` (answer tokens, then EOS)."""
        raise NotImplementedError

    @property
    def max_answer_tokens(self) -> int:
        raise NotImplementedError

    def sample(self, rng: random.Random):
        prompt = [BOS, *self.question(rng), SEP]
        return prompt, self.answer_of(prompt)

    def reward(self, prompt, completion) -> float:
        return 1.0 if list(completion) == self.answer_of(prompt) else 0.0


@dataclasses.dataclass
class ReverseTask(Task):
    """Reverse a string of min_len..max_len letters drawn from the first `alphabet` letters."""
    min_len: int = 3
    max_len: int = 6
    alphabet: int = 8
    name = "reverse"

    def __post_init__(self):
        _check_int("min_len", self.min_len, 1)
        _check_int("max_len", self.max_len, self.min_len)
        _check_int("alphabet", self.alphabet, 2, 26)

    def question(self, rng):
        return [LETTER_A + rng.randrange(self.alphabet) for _ in range(rng.randint(self.min_len, self.max_len))]

    def answer_of(self, prompt):
        return list(reversed(prompt[1:-1])) + [EOS]

    @property
    def max_answer_tokens(self):
        return self.max_len + 1


@dataclasses.dataclass
class SortTask(ReverseTask):
    """Sort a string of letters (same prompts as "reverse")."""
    name = "sort"

    def answer_of(self, prompt):
        return sorted(prompt[1:-1]) + [EOS]


@dataclasses.dataclass
class AdditionTask(Task):
    """a + b for numbers of 1..digits digits; the answer's digits come least significant first when `reverse`
    (the order in which a left-to-right model can carry)."""
    digits: int = 2
    reverse: bool = True
    name = "addition"

    def __post_init__(self):
        _check_int("digits", self.digits, 1, 9)
        if not isinstance(self.reverse, bool):
            raise ValueError(f"reverse must be a bool, got {self.reverse!r}")

    @staticmethod
    def _number(tokens):
        return int("".join(str(t - DIGIT0) for t in tokens))

    def question(self, rng):
        def number():
            return [DIGIT0 + int(c) for c in str(rng.randrange(10 ** rng.randint(1, self.digits)))]
        return [*number(), PLUS, *number()]

    def answer_of(self, prompt):
        plus = prompt.index(PLUS)
        total = str(self._number(prompt[1:plus]) + self._number(prompt[plus + 1:-1]))
        digits = [DIGIT0 + int(c) for c in (reversed(total) if self.reverse else total)]
        return digits + [EOS]

    @property
    def max_answer_tokens(self):
        return self.digits + 2


TASKS = {"reverse": ReverseTask, "sort": SortTask, "addition": AdditionTask}


def make_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    try:
        return TASKS[name](**options)
    except TypeError as exc:
        fields = [f.name for f in dataclasses.fields(TASKS[name])]
        raise ValueError(f"task_options for {name!r} take {fields}, got {sorted(options)}") from exc
