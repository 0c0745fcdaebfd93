"""The rewards of the RL stage: the built-in checker, user reward functions, a trained reward model, combined.

    --rl.reward=builtin                  exact match against the prompt's `answer` column (the built-in tasks' checker)
    --rl.reward=package.module:function  called as TRL calls reward functions:
                                             f(prompts=[...], completions=[...], completion_ids=[[...], ...],
                                               **columns)  -> one float per completion
                                         prompts and completions in the record's format (a string, or a list of
                                         messages: then each completion is [{"role": "assistant", "content": ...}]);
                                         every other column of the prompts' records as a list, one per completion
    --rl.reward_model=RUN_DIR            a --stage rm run scoring prompt + completion (cut after its first <|end|>,
                                         right-padded with <|pad|>) at the completion's last token
    --rl.reward_model=RUN_A,RUN_B,...    an ensemble: each member's scores standardised over the completions scored
                                         together, then combined per completion by --rl.reward_model_combine (min,
                                         the worst case, or mean; Coste et al. 2023): one reward, `reward_model`
Several are named with commas and weighted with --rl.reward_weights (in that order, the reward model last); the total
is the weighted sum. --rl.reward='' (the default) means builtin, or, when --rl.reward_model is given, the reward
model alone (it replaces the built-in reward); `--rl.reward=builtin --rl.reward_model=RUN` keeps both. Each
reward's mean is logged as rewards/NAME/mean (NAME: a function's own name, or `builtin`, `reward_model`; an
ensemble's members' raw scores also as rewards/reward_model_K/mean, K = 1, 2, ... in the order given).

A reward function is code the user names on the command line, imported as any Python module; nothing from a run
folder is ever imported (a reward model's checkpoint is read with the restricted unpickler: weights only).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from data.synthetic import answer_matches, partial_credit
from data.tokenizer import PAD_ID, Tokenizer
from model.gpt import GPTConfig
from model.reward import RewardModel, is_reward_state
from training import checkpoint
from training.weights import load_weights

BUILTIN = "builtin"


def builtin_reward(prompts, completions, answer=None, **columns) -> list[float]:
    """1.0 when the completion's text equals the `answer` column (data/synthetic.py:answer_matches), else 0.0."""
    if answer is None:
        raise ValueError("the built-in reward compares completions with an 'answer' column, and the prompts have "
                         "none: give records with 'answer' (or a conversation whose last assistant turn is the "
                         "answer), or name another --rl.reward")
    return [float(answer_matches(completion_text(c), str(a))) for c, a in zip(completions, answer, strict=True)]


def partial_credit_reward(prompts, completions, task=None, answer=None, **columns) -> list[float]:
    """The built-in tasks' partial credit (data/synthetic.py:partial_credit, in [0, 1], 1 only for the exact answer)
    of each completion: a denser signal than exact match where a group's answers are all wrong but some are closer.
    Named as any reward function: --rl.reward=builtin,training.rewards:partial_credit_reward."""
    if task is None or answer is None:
        raise ValueError("partial_credit_reward rates answers to the built-in tasks: the prompts need 'task' and "
                         "'answer' columns (the built-in synthetic data has both)")
    return [partial_credit(t, completion_text(c), str(a)) for c, t, a in zip(completions, task, answer, strict=True)]


def completion_text(completion) -> str:
    """The text of a completion in either format (a string, or [{"role": "assistant", "content": ...}])."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def import_reward(spec: str) -> Callable:
    """`package.module:function` -> the function; ValueError naming spec when it cannot be imported."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--rl.reward={spec!r}: expected 'builtin' or package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or any error raised while the module runs
        raise ValueError(f"--rl.reward={spec!r}: cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--rl.reward={spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


@dataclass
class Rollouts:
    """What every reward reads of one batch of N completions (rows in groups of G per prompt)."""

    prompts: list  # (N,) each completion's prompt, as its record gives it
    completions: list  # (N,) the completion text, or [{"role": "assistant", "content": text}] for chat prompts
    completion_ids: list[list[int]]  # (N,) generated ids up to and including the first <|end|>
    columns: dict[str, list]  # column -> (N,) values of the prompts' other columns
    prompt_ids: list[list[int]]  # (N,) rendered prompt ids (what a reward model reads before the completion)
    where: list[str]  # (N,) each completion's prompt record, "record I of FILE" (named in errors)


def call_reward(name: str, fn: Callable, r: Rollouts) -> torch.Tensor:
    """fn's rewards (N,) fp32; ValueError naming the reward (and the prompt's record, where one can be named) when
    it raises, returns another number of values, or a value that is not a finite number."""
    try:
        values = fn(prompts=r.prompts, completions=r.completions, completion_ids=r.completion_ids, **r.columns)
    except Exception as e:
        where = _failing_prompt(fn, r)
        raise ValueError(f"reward {name!r} raised {type(e).__name__}: {e}{where}") from e
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"reward {name!r} returned {type(values).__name__}, not a list of floats") from None
    if len(values) != len(r.completions):
        raise ValueError(f"reward {name!r} returned {len(values)} values for {len(r.completions)} completions "
                         "(one float per completion)")
    numbers = []
    for i, v in enumerate(values):
        number = _as_number(v)
        if number is None or not math.isfinite(number):
            raise ValueError(f"reward {name!r} returned {v!r} for completion {i} (the prompt of {r.where[i]}); every "
                             "reward must be a finite number (None, TRL's 'not applicable', is not supported)")
        numbers.append(number)
    return torch.tensor(numbers, dtype=torch.float32)


def _as_number(v) -> float | None:
    """A Python, numpy or 0-d tensor number as a float; None for anything else (bools included)."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _failing_prompt(fn: Callable, r: Rollouts) -> str:
    """' on the prompt of record I of FILE (completion ...)' for the first completion fn raises on when called
    alone, or '' if none does."""
    for i in range(len(r.completions)):
        try:
            fn(prompts=r.prompts[i:i + 1], completions=r.completions[i:i + 1],
               completion_ids=r.completion_ids[i:i + 1], **{k: v[i:i + 1] for k, v in r.columns.items()})
        except Exception:
            return f" on the prompt of {r.where[i]} (completion {r.completions[i]!r})"
    return ""


class RewardModelScorer:
    """A frozen reward model (model/reward.py) scoring prompt + completion at the completion's last token."""

    def __init__(self, run_dir: str, tok: Tokenizer, block_size: int, where: str = "--rl.reward_model") -> None:
        ckpt = checkpoint.load(run_dir)
        where = f"{where} {run_dir}"
        if not is_reward_state(ckpt["model"]):
            raise ValueError(f"{where}: {ckpt['path']} is not a reward model (stage {ckpt.get('stage')!r}, no score "
                             "head); train one with --stage rm and pass its run folder")
        if ckpt.get("tokenizer_hash") != tok.hash:
            raise ValueError(f"{where}: its tokenizer (hash {ckpt.get('tokenizer_hash')}) differs from the policy's "
                             f"({tok.hash}); a reward model scores token ids, so it must share the policy's tokenizer")
        self.gcfg = GPTConfig.from_dict(ckpt["model_config"])
        if self.gcfg.block_size < block_size:
            raise ValueError(f"{where}: its block_size {self.gcfg.block_size} is shorter than the policy's "
                             f"{block_size}, so it could not score every completion")
        self.path, self.state = ckpt["path"], ckpt["model"]
        self.model = None

    def build(self, device, wrap: Callable) -> None:
        """The frozen model on the policy's numeric path (wrap: training/distributed.py:wrap_reference)."""
        model = RewardModel(self.gcfg).to(device)
        load_weights(model, self.state)
        self.model = wrap(model.eval().requires_grad_(False))
        self.state = None

    @torch.no_grad()
    def __call__(self, r: Rollouts, device, autocast) -> torch.Tensor:
        """Scores (N,) fp32 of prompt_ids + completion_ids, right-padded with <|pad|>, read at each last token."""
        seqs = [p + c for p, c in zip(r.prompt_ids, r.completion_ids, strict=True)]
        ids = torch.full((len(seqs), max(map(len, seqs))), PAD_ID, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
        ends = torch.tensor([len(s) - 1 for s in seqs])
        with autocast:
            return self.model(ids.to(device), end_positions=ends.to(device)).float()


class RewardModelEnsemble:
    """The reward model, or several (--rl.reward_model=RUN_A,RUN_B,...) combined into one reward.

    A single reward model's score is used as it is. Several are combined per completion after standardising each
    member's scores over the N completions scored together (one micro-batch of B x G rows on one rank, whole
    groups; a validation chunk), because members trained on different data score on different scales; `min` is
    the worst case over the members (an answer only scores well if every member likes it, so a hole a policy finds
    in one member helps only if it is a hole in all), `mean` their average. Coste et al. 2023, "Reward Model
    Ensembles Help Mitigate Overoptimization". Measured here (README, sixth chain): min over three members, two of
    them poor judges of the policy's own samples, collapsed as a single poor one does."""

    def __init__(self, run_dirs: str, tok: Tokenizer, block_size: int, combine: str) -> None:
        dirs = [d.strip() for d in run_dirs.split(",") if d.strip()]
        if len(set(dirs)) != len(dirs):
            raise ValueError(f"--rl.reward_model={run_dirs!r} names a reward model twice")
        self.members = [RewardModelScorer(d, tok, block_size) for d in dirs]
        self.combine = combine

    @property
    def member_names(self) -> list[str]:
        """What an ensemble's members' raw scores are logged as (rewards/reward_model_K/mean); none for one model."""
        return [f"reward_model_{k + 1}" for k in range(len(self.members))] if len(self.members) > 1 else []

    def build(self, device, wrap: Callable) -> None:
        for member in self.members:
            member.build(device, wrap)

    def __call__(self, r: Rollouts, device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        """(the combined reward (N,), each member's raw scores (N, K)), fp32."""
        scores = torch.stack([member(r, device, autocast) for member in self.members], dim=1)  # (N, K)
        return combine_scores(scores, self.combine), scores


def combine_scores(scores: torch.Tensor, how: str) -> torch.Tensor:
    """scores (N, K) of N completions by K reward models -> (N,): column 0 as it is when K == 1; otherwise each
    column standardised, (s - its mean) / (its sample std + 1e-4) (all 0 when N < 2), then the min or the mean of
    each row."""
    if scores.shape[1] == 1:
        return scores[:, 0]
    if scores.shape[0] < 2:
        z = torch.zeros_like(scores)
    else:
        z = (scores - scores.mean(0)) / (scores.std(0) + 1e-4)  # (N, K)
    if how == "min":
        return z.min(1).values
    if how == "mean":
        return z.mean(1)
    raise ValueError(f"--rl.reward_model_combine={how!r}: expected min or mean")


def reward_names(cfg_reward: str, reward_model: str) -> list[str]:
    """The rewards in order (module docstring): the named ones, then 'reward_model'. --rl.reward='' (the default)
    means builtin, or the reward model alone when one is given."""
    names = [n.strip() for n in cfg_reward.split(",") if n.strip()]
    if not names and not reward_model:
        names = [BUILTIN]
    if reward_model:
        names.append("reward_model")
    if len(set(names)) != len(names):
        raise ValueError(f"--rl.reward names a reward twice: {names}")
    return names


def display_name(spec: str) -> str:
    """The name a reward is logged under (train/rewards/NAME/mean): as TRL, a function's own name."""
    return spec.partition(":")[2] or spec


def reward_weights(text: str, names: list[str]) -> list[float]:
    """--rl.reward_weights as floats, one per reward ('' = 1 each)."""
    if not text.strip():
        return [1.0] * len(names)
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--rl.reward_weights={text!r}: expected comma-separated numbers") from None
    if len(weights) != len(names) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"--rl.reward_weights={text!r}: give one finite weight per reward {names}")
    return weights
