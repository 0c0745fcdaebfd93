"""Measure a checkpoint: language modelling, instruction following, preferences, and a few samples.

    python scripts/evaluate.py runs/tiny --json eval.json                   # the run's own validation data
    python scripts/evaluate.py runs/tiny --data stdlib --max-tokens 100000  # any text source of the data pipeline
    python scripts/evaluate.py runs/sft --chat-data synthetic --prompt "What is 2+3?" --json eval.json
    python scripts/evaluate.py runs/dpo --preference-data prefs.jsonl --reference runs/sft --tensorboard
    torchrun --nproc_per_node=4 scripts/evaluate.py runs/gpt2 --data prepared/fineweb --split val  # a prepared folder's val
    python scripts/evaluate.py runs/gpt2 --data hf:HuggingFaceFW/fineweb-edu:sample-10BT --max-tokens 1e7  # streamed, capped
    python scripts/evaluate.py runs/sft --choices sums.jsonl --chat --json mc.json       # multiple choice, chat format
    python scripts/evaluate.py runs/rl --synthetic-size 400 --samples-per-prompt 16        # sampled replies too
    python scripts/evaluate.py runs/rl2 --samples-per-prompt 4 --kl-reference runs/sft       # KL to the SFT model

Which part of a source: the validation split of the run's own data (the same source and, for a pre-training run, the
same prepared-data hash as the run recorded; the run's own preparation in the cache is reused), of chat and of
preference data; a text source the run did not train on is scored whole (train+val splits; a prepared folder: every
split it holds). A prepared folder is the run's own data only when its data hash is the one the run recorded: any
other (another run's 10B-token folder, say) is scored whole, so give --split val (or --max-tokens) to score its
validation split alone. --split val|train|all narrows or widens that on purpose (a split the source does not hold is
then an error). The output's data label says what was scored.

What is measured:
  text        val_loss (nats per target token), perplexity, bits_per_byte = summed nats of the text targets / (ln 2 x
              their UTF-8 bytes; special tokens such as <|endoftext|>, 0 bytes, are left out of both sums: the
              trainer's definition, training/evaluation.py), tokens, bytes. Blocks of block_size tokens, as the
              trainer's validation.
  chat        accuracy: exact match of the greedy reply (stopping at <|end|>) with the reference, for records with
              `messages` (the last assistant turn is the reference) or `prompt` + `completion`; per task when the
              records name one (the built-in `synthetic` tasks do). A prompt of block_size tokens or more (no room
              for a reply) is left out, as in the trainer's validation, and the count is printed.
              --samples-per-prompt K adds K replies per prompt sampled at --samples-temperature (1.0, the RL
              stage's sampling; each reply's noise keyed by --seed, the prompt's index and the sample, so any
              number of ranks gives the same figures): sampled_accuracy (the share of right replies, mean@K),
              pass_at_k (prompts with a right reply among their K) and all_equal_share (prompts whose K replies are
              all right or all wrong: the groups in which RL's group-relative advantage is 0), per task too.
              --judge RM_RUN_DIR (a --stage rm run sharing the tokenizer) also scores each reply as RL scores it
              (prompt + the reply's generated ids, read at its last token): best_of_k_accuracy (its highest-scored
              reply of each prompt is right: best-of-K selection by the reward model) and judge_pair_accuracy (of
              the (right, wrong) reply pairs of a prompt, the share it scores right above wrong): how well a reward
              model ranks what the policy actually writes, which the built-in pairs do not measure.
              --kl-reference RUN_DIR (a policy run with the same tokenizer: the SFT run an RL chain started from,
              say) measures how far the policy has moved from it where the policy samples: at each token of the K
              replies, the exact KL(policy || reference) of the two next-token distributions at the sampling
              temperature, over the whole vocabulary. kl_per_token (nats per reply token, the scale of RL's
              train/kl, which estimates the same quantity from one token) and kl_to_reference (nats per reply).
  preference  on `prompt`/`chosen`/`rejected` records: preference_accuracy (share of pairs whose DPO reward, beta x
              the log-ratio to the reference model, is higher for the chosen answer) and reward_margin (mean
              chosen - rejected reward) against --reference (default: the checkpoint the run started from; beta and
              loss type from the run's [dpo] config), and without a reference: logp_accuracy, logp_margin (the
              completion log-probs of the model alone).
  choices     on --choices FILE.jsonl, records {"question" (or "context"), "choices": [...], "answer": index}:
              each choice scored by its summed log-prob given the context, all (record, choice) pairs in one batched
              pass, contexts cut from the left to the model's context (never the choice). mc_accuracy (the highest
              log-prob is the answer), mc_accuracy_norm (log-prob divided by the choice's length in characters: the
              harness's acc_norm), mc_accuracy_bytes (divided by its UTF-8 bytes: acc_bytes); a tie goes to the first
              choice; mc_loglikelihoods holds every choice's log-prob, record by record. The conventions are those of
              lm-evaluation-harness (data/choices.py), so its figures on the exported model are the same:
                plain (default)  the continuation is " " + choice after the context (its default target_delimiter),
                                 the context's trailing whitespace moved into the continuation, the pair encoded
                                 whole and split at the length of the encoded context;
                --chat           the context as a user turn followed by <|assistant|>, the choice scored with no
                                 delimiter and no closing <|end|> (lm_eval --apply_chat_template).
              A chat-tuned run scored without --chat prints a hint. The parity holds in fp32: lm_eval scores the
              exported model (float32) in float32, while --precision auto is bf16 autocast on a bf16-capable GPU
              (log-likelihoods ~1e-2 apart, an accuracy may differ on near ties): give --precision fp32 for the
              harness's figures (a notice says so otherwise). With --choices alone only multiple choice is
              measured. A bad record (not JSON, a missing key, no choices, an empty choice, an answer index out of
              range) is an error naming the file and the record, before any model work.
Sources: --data SOURCE is sorted by its fields (`text`-like -> text, chat records -> chat, pairs -> preference;
`synthetic` is the built-in chat task, or its preference pairs for a DPO run); --chat-data / --preference-data name the
kind explicitly (`--preference-data synthetic` for the built-in pairs). Without any of them the run's own
validation data is measured: text for a pre-training run, chat for SFT, preference and chat (chosen answers) for DPO.
A reward model (--stage rm) is measured on pairs or rated completions instead: preference_accuracy (share of pairs
it scores chosen > rejected), reward_margin (mean score difference) and preference_loss (Bradley-Terry), or
reward_mse (against the ratings, standardised as in training when the run was), on --data / --preference-data or the run's own data.

Output: a table on the console, --json FILE with every figure and what it was measured on (checkpoint, step, data =
{kind: source and split}, tokens, bytes, examples, pairs, reference), --tensorboard adds the figures to the run's TensorBoard and
metrics.jsonl under eval/ at the checkpoint's step. Under torchrun the text blocks, chat items, pairs and choices are split
across ranks and the sums reduced, so figures equal the single-process ones; rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a plain checkout, not installed: as train.py

from data import shards
from data.chat import render_prompt
from data.choices import ChoiceRecord, encode_pairs, load_choices, mc_accuracies
from data.preference import PreferenceBatcher, load_preferences, prompt_and_reference
from data.prepare import preparation_key, prepare, read_manifest
from data.reward import RewardBatcher, load_reward_data, score_stats, standardize_scores
from data.sft import load_records
from data.sources import RECORD_FORMATS, local_files, parse_source
from data.sources import SPLITS as SOURCE_SPLITS
from data.synthetic import answer_matches
from data.tokenizer import PAD_ID
from model.losses import categorical_kl
from model.reward import RewardModel
from training import distributed
from training.cli import run_script
from training.config import DistSection
from training.evaluation import (
    chat_accuracy,
    group_counts,
    group_figures,
    judge_counts,
    judge_figures,
    lm_figures,
    sampled_replies,
)
from training.load import PRECISIONS, LoadedRun, load_run, refuse_reward_model
from training.monitor import Monitor, print0
from training.rewards import RewardModelScorer, Rollouts
from training.stages import STAGES
from training.stages.dpo import DPO, preference_figures
from training.stages.rm import PairwiseReward, RatingRegression
from training.tokenizer_cache import cache_root, hf_cache_dir

KINDS = ("text", "chat", "preference")
SPLITS = {**{split: (split,) for split in SOURCE_SPLITS}, "all": SOURCE_SPLITS}  # --split -> data splits


# ----------------------------------------------------------------------------------------------- which data
def peek_fields(source: str) -> set[str] | None:
    """Field names of a local tabular source's records (None for plain text); read from the first file only."""
    src = parse_source(source)  # FileNotFoundError for a missing path
    if not src.is_local or shards.is_prepared_dir(src.path):
        return None  # stdlib, hub names: the loaders give the precise error; a prepared folder is text
    files = local_files(src.path)
    if files[0].suffix.lower() not in RECORD_FORMATS:
        return None
    f, suffix = files[0], files[0].suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(f).names)
    with open(f, encoding="utf-8") as fh:
        if suffix == ".csv":
            return set(next(csv.reader(fh), []))
        if suffix == ".jsonl":
            line = next((ln for ln in fh if ln.strip()), "{}")
            record = json.loads(line)
        else:
            data = json.load(fh)
            record = data[0] if isinstance(data, list) and data else data
    return set(record) if isinstance(record, dict) else set()


def detect_kind(source: str, stage: str, text_column: str) -> str:
    """text | chat | preference, from the records' fields (see the module docstring)."""
    if source == "synthetic":  # the built-in tasks: the stage's own kind of records
        return "preference" if STAGES[stage].synthetic_records == "dpo" else "chat"
    fields = peek_fields(source)
    if fields is None:
        return "text"
    if {"prompt", "chosen", "rejected"} <= fields:
        return "preference"
    if "messages" in fields or {"prompt", "completion"} <= fields:
        return "chat"
    if text_column in fields:
        return "text"
    raise ValueError(f"--data {source}: its records have fields {sorted(fields)}, none of which evaluation can use: "
                     f"it needs {text_column!r} (language modelling; see --text-column), 'messages' or 'prompt' + "
                     "'completion' (accuracy), or 'prompt' + 'chosen' + 'rejected' (preferences)")


def plan(args, run: LoadedRun) -> dict[str, str]:
    """kind -> source to measure."""
    todo: dict[str, str] = {}
    if args.data:
        todo[detect_kind(args.data, run.cfg.stage, args.text_column)] = args.data
    for kind, source in (("chat", args.chat_data), ("preference", args.preference_data)):
        if source:
            if kind in todo:
                raise ValueError(f"--data {args.data} is {kind} data and --{kind}-data is given too: give one")
            todo[kind] = source
    if not todo and not args.choices:  # --choices alone: only multiple choice
        if run.ckpt.get("imported_from"):
            raise ValueError(f"{run.ckpt['path']} was imported from {run.ckpt['imported_from']} and has no data of its "
                             "own: give --data, --chat-data or --preference-data")
        own = run.cfg.data.source
        for kind in STAGES[run.cfg.stage].eval_kinds:  # what the run's stage trains and validates on
            todo[kind] = own
    return todo


# ----------------------------------------------------------------------------------------------- measurements
def recorded_data_hash(run: LoadedRun) -> str | None:
    """The hash of the prepared data a pre-training run trained on, as its checkpoint records it (else None)."""
    loader = run.ckpt.get("loader")
    return loader.get("data_hash") if isinstance(loader, dict) else None


def same_source(a: str, b: str) -> bool:
    """Whether two --data strings name the same source: the same string, or paths to the same file or folder."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def text_splits(split: str | None, own: bool, held: tuple[str, ...] = SOURCE_SPLITS) -> tuple[str, ...]:
    """--split, or by default the validation split of the run's own data and all of any other source: all the
    splits it holds (`held`), as a prepared folder may hold only some (one prepared with --split val, say)."""
    if split or own:
        return SPLITS[split or "val"]
    return tuple(s for s in SOURCE_SPLITS if s in held)


def text_data(run: LoadedRun, source: str, args, info) -> tuple[shards.PreparedData, bool]:
    """The prepared data to score, and whether it is the data the run trained on (the same source and, where the run
    recorded it, the same prepared-data hash). A prepared folder (--data DIR) is used as it is; the run's own source
    is prepared as the trainer did (its cache, when there, is reused; a local source is prepared again when it is
    not, to check its hash); any other source gets the splits to score prepared into the cache with --max-tokens as
    the cap of the first of them while reading (a Hub stream is read only that far)."""
    cfg, d = run.cfg, run.cfg.data
    recorded = recorded_data_hash(run)
    if shards.is_prepared_dir(source):
        data = shards.open_prepared(source)
        own = data.hash == recorded if recorded else same_source(source, d.source)
    else:
        if info.nodes > 1:  # each machine would prepare its own copy; the first done would wait in a collective
            raise ValueError(f"--data {source}: under a torchrun of {info.nodes} nodes give a prepared folder "
                             f"(python scripts/prepare_data.py {source} --out DIR, then --data DIR)")
        common = dict(source=source, tokenizer=run.tok, workers=d.num_proc, overwrite=True, verbose=info.is_main,
                      hf_cache_dir=hf_cache_dir(cfg), block_size=run.gcfg.block_size)
        settings = dict(text_column=args.text_column, val_fraction=d.val_fraction, max_tokens=d.max_tokens,
                        max_docs=d.max_docs, chunk_tokens=d.chunk_tokens)
        out = shards.default_shard_dir(cache_root(cfg) / "shards", source, run.tok, **settings)
        own = same_source(source, d.source)
        # the run's own preparation: from the cache, or prepared again for a local source (a Hub stream is not read
        # whole only to compare hashes: its name stands for its content, as in the data pipeline)
        if own and (_complete(out, preparation_key(source, run.tok, SOURCE_SPLITS, **settings))
                    or (recorded and parse_source(source).is_local)):
            prepare(out_dir=out, **common, **settings)
            data = shards.open_prepared(out)
            own = recorded is None or data.hash == recorded
        else:
            settings = dict(splits=text_splits(args.split, own), text_column=args.text_column,
                            val_fraction=d.val_fraction, max_tokens=args.max_tokens, chunk_tokens=d.chunk_tokens)
            out = shards.default_shard_dir(cache_root(cfg) / "shards", source, run.tok, **settings)
            # scored whole, a split need not fill a block by itself (a lone file's last 1% seldom does): what must
            # hold at least one block is checked over all the scored splits, in text_figures
            whole = len(settings["splits"]) > 1
            prepare(out_dir=out, **(common | {"block_size": None} if whole else common), **settings)
            data = shards.open_prepared(out)
    data.check_tokenizer(run.tok, f"the run {run.ckpt['path']}")
    if recorded and not own and same_source(source, d.source):
        print0(f"data: {source} is not what the run trained on (prepared data {data.hash[:16]}, the run's "
               f"{recorded[:16]})")
    return data, own


def _complete(out: Path, key: dict) -> bool:
    manifest = read_manifest(out)
    return manifest is not None and bool(manifest.get("complete")) and manifest.get("key") == key


def text_figures(run: LoadedRun, source: str, args, info) -> tuple[dict, str]:
    """Loss, perplexity, bits per byte over the source's blocks (the trainer's validation, without a token cap)."""
    T = run.gcfg.block_size
    data, own = text_data(run, source, args, info)
    splits = text_splits(args.split, own, data.splits)
    if not splits:
        raise ValueError(f"--data {source}: the prepared folder holds no train or val split (it holds {data.splits})")
    parts, n_batches, n_blocks = [], 0, 0
    for split in splits:
        chunks = data.chunks(split)
        blocks = shards.count_eval_blocks(chunks, T, args.max_tokens or None)
        if blocks == 0:  # scored whole, a split shorter than a block (checked whole below) adds nothing
            continue
        mine = len(range(info.rank, blocks, info.world_size))
        parts.append(chunks)
        n_batches += -(-mine // args.batch_size)
        n_blocks += blocks
    if n_blocks == 0:  # the same on every rank
        counts = ", ".join(f"{s} {data.split(s)['tokens']}" for s in splits)
        raise ValueError(f"--data {source} is too small to score: no split holds one block of block_size={T} "
                         f"(needs {T + 1} tokens: inputs plus the shifted targets; it holds {counts})")
    budget = args.max_tokens or None

    def batches():
        for chunks in parts:
            yield from shards.eval_batches(chunks, args.batch_size, T, max_tokens=budget, rank=info.rank,
                                           world_size=info.world_size, device=run.device)

    byte_lengths = torch.as_tensor(run.tok.token_byte_lengths(), device=run.device).long()
    bar = tqdm(batches(), total=n_batches, desc="text", unit="batch", disable=not info.is_main)
    f = lm_figures(run.model, bar, byte_lengths, run.autocast)
    figures = {"val_loss": f["loss"], "perplexity": f["perplexity"], "bits_per_byte": f["bpb"],
               "tokens": int(f["tokens"]), "bytes": int(f["bytes"])}
    whole = not own and args.split is None  # by default a source the run did not train on is scored whole
    return figures, f"{source} ({text_label(splits, own, args.max_tokens, whole)})"


def text_label(splits: tuple[str, ...], own: bool, max_tokens: int, whole: bool = False) -> str:
    """What of a text source was scored: "val split", "train+val splits, first 1000 tokens of each", and for a
    source the run did not train on (scored whole by default) "whole (train+val splits); not the run's data", or
    "whole (val split)" for a prepared folder that holds only that split."""
    label = f"{'+'.join(splits)} split{'s' if len(splits) > 1 else ''}"
    if max_tokens:
        label += f", first {max_tokens} tokens" + (" of each" if len(splits) > 1 else "")
    elif whole or (not own and splits == SOURCE_SPLITS):
        label = f"whole ({label})"
    return label + ("" if own else "; not the run's data")


def check_synthetic_flags(source: str, args) -> None:
    if source != "synthetic" and (args.synthetic_size or args.synthetic_seed is not None):
        raise ValueError(f"--synthetic-size / --synthetic-seed choose the built-in records; the data here is {source!r}")


def synthetic_draw(run: LoadedRun, split: str, args) -> tuple[int, int]:
    """(seed, size) of the built-in records of a split: the run's (data.synthetic_val / synthetic_train,
    train.seed), or --synthetic-size / --synthetic-seed, so runs of different seeds are scored on the same prompts."""
    if args.synthetic_size < 0:
        raise ValueError(f"--synthetic-size={args.synthetic_size} must be >= 0 (0 = the run's)")
    n = run.cfg.data.synthetic_val if split == "val" else run.cfg.data.synthetic_train
    seed = run.cfg.train.seed if args.synthetic_seed is None else args.synthetic_seed
    return seed, args.synthetic_size or n


def _records(source: str, kind: str, args, run: LoadedRun) -> tuple[list[tuple[int, dict]], str]:
    check_synthetic_flags(source, args)
    out, labels = [], []
    for split in SPLITS[args.split or "val"]:
        seed, n = synthetic_draw(run, split, args)
        recs, label = load_records(source, split, kind, seed, n, hf_cache_dir(run.cfg))
        out += recs[: args.max_examples or None]
        labels.append(label)
    return out, " + ".join(labels)


def chat_items(source: str, args, run: LoadedRun) -> tuple[list[tuple[list[dict], str, str]], str]:
    """(prompt messages, reference answer, task) of each record: the last assistant turn is the reference; for
    preference records (a DPO run's own data) the chosen answer is. A prompt that leaves no room for a reply in the
    context (block_size tokens or more) is not scored, as in the trainer's validation."""
    kind = STAGES[run.cfg.stage].synthetic_records if source == "synthetic" else "sft"
    records, label = _records(source, kind, args, run)
    items, too_long = [], 0
    for i, rec in records:
        prompt, reference = prompt_and_reference(rec, f"record {i} of {label}")
        prompt_ids = render_prompt(prompt, run.tok)  # validates roles and contents, clear error
        if len(prompt_ids) >= run.gcfg.block_size:  # no room to reply: generate() would cut the prompt
            too_long += 1
            continue
        items.append((prompt, reference, str(rec.get("task") or "")))
    if too_long:
        print(f"chat: {too_long} of {len(records)} prompts not scored: {run.gcfg.block_size} tokens or longer "
              "(the trainer's validation leaves them out too)", file=sys.stderr)
    if not items:
        raise ValueError(f"{label}: no records to evaluate" + (f" ({too_long} prompts of {run.gcfg.block_size} "
                                                               "tokens or longer)" if too_long else ""))
    return items, label


def accuracy_figures(run: LoadedRun, items, info) -> dict:
    """Exact-match accuracy of greedy replies (training/evaluation.chat_accuracy per item), overall and per task."""
    tasks = sorted({t for _, _, t in items})
    mine = list(range(info.rank, len(items), info.world_size))
    # per task: [correct, count]; the last row is the total
    sums = torch.zeros(len(tasks) + 1, 2, dtype=torch.float64, device=run.device)
    for i in tqdm(mine, desc="chat", unit="example", disable=not info.is_main):
        messages, reference, task = items[i]
        correct = chat_accuracy(run.model, run.tok, [(messages, reference)], run.autocast, run.device,
                                reply_budget(run, reference))
        for row in (tasks.index(task), len(tasks)):
            sums[row] += torch.tensor([correct, 1.0], dtype=torch.float64, device=run.device)
    distributed.all_reduce(sums)
    figures = {"accuracy": sums[-1, 0].item() / sums[-1, 1].item(), "examples": int(sums[-1, 1].item())}
    if tasks != [""]:
        figures["accuracy_by_task"] = {t or "(none)": sums[j, 0].item() / sums[j, 1].item() for j, t in
                                       enumerate(tasks)}
    return figures


def reply_budget(run: LoadedRun, reference: str) -> int:
    """New tokens a reply may take: the trainer's 32, or room for a long reference written in up to twice as many
    tokens."""
    return max(32, 2 * len(run.tok.encode(reference)) + 2)


def sampled_figures(run: LoadedRun, items, args, info) -> dict:
    """--samples-per-prompt K: K replies to each prompt sampled at --samples-temperature, scored by exact match;
    training/evaluation.group_figures overall and per task. Each reply's noise is keyed by (--seed, prompt index,
    sample), so the figures are the same on any number of ranks. --judge RM: the reward model also scores each
    reply (its generated ids after the rendered prompt, as RL scores them): judge_figures. --kl-reference RUN: the
    exact KL of each reply's next-token distributions to that run's: kl_figures."""
    k, tasks = args.samples_per_prompt, sorted({t for _, _, t in items})
    sums = torch.zeros(len(tasks) + 1, 5, dtype=torch.float64)  # group_counts per task; the last row is the total
    judged = torch.zeros(len(tasks) + 1, 3, dtype=torch.float64)  # judge_counts per task
    kl = torch.zeros(len(tasks) + 1, 2, dtype=torch.float64)  # (nats, reply tokens) per task
    judge = load_judge(run, args.judge) if args.judge else None
    reference = load_kl_reference(run, args.kl_reference) if args.kl_reference else None
    for i in tqdm(range(info.rank, len(items), info.world_size), desc="sampled", unit="prompt",
                  disable=not info.is_main):
        messages, reference_answer, task = items[i]
        ids = render_prompt(messages, run.tok)
        room = run.gcfg.block_size - len(ids)  # >= 1: chat_items left out the rest
        replies, reply_ids = sampled_replies(run.model, run.tok, ids, k, args.samples_temperature,
                                             min(reply_budget(run, reference_answer), room), args.seed, i,
                                             run.device, with_ids=True)
        right = [answer_matches(r, reference_answer) for r in replies]
        counts = group_counts(torch.tensor([right]))
        sums[tasks.index(task)] += counts
        sums[-1] += counts
        if judge is not None:
            rollouts = Rollouts([messages] * k, replies, reply_ids, {}, [ids] * k, [f"prompt {i}"] * k)
            c = judge_counts(right, judge(rollouts, run.device, run.autocast).cpu())
            judged[tasks.index(task)] += c
            judged[-1] += c
        if reference is not None:
            c = reply_kl(run.model, reference.model, ids, reply_ids, args.samples_temperature, run.device)
            kl[tasks.index(task)] += c
            kl[-1] += c
    both = torch.cat([sums, judged, kl], dim=1).to(run.device)
    distributed.all_reduce(both)
    sums, judged, kl = both[:, :5].cpu(), both[:, 5:8].cpu(), both[:, 8:].cpu()

    def extra(j: int) -> dict:
        out = judge_figures(judged[j], sums[j, 2].item()) if judge is not None else {}
        return out | (kl_figures(kl[j], sums[j, 1].item()) if reference is not None else {})

    figures = {"samples_per_prompt": k, "samples_temperature": args.samples_temperature, **group_figures(sums[-1])}
    figures |= {"judge": args.judge} if judge is not None else {}
    figures |= {"kl_reference": args.kl_reference} if reference is not None else {}
    figures |= extra(-1)
    if tasks != [""]:
        figures["sampled_by_task"] = {t or "(none)": group_figures(sums[j]) | extra(j) for j, t in enumerate(tasks)}
    return figures


def load_kl_reference(run: LoadedRun, run_dir: str) -> LoadedRun:
    """--kl-reference: a policy run with the policy's tokenizer and vocabulary (KL compares distributions over the
    same token ids), loaded on the policy's device in its precision."""
    ref = load_run(run_dir, str(run.device), run.precision)
    refuse_reward_model(ref, f"--kl-reference {run_dir}")
    if ref.tok.hash != run.tok.hash or ref.gcfg.vocab_size != run.gcfg.vocab_size:
        raise ValueError(f"--kl-reference {run_dir}: its tokenizer (hash {ref.tok.hash[:12]}, vocab_size "
                         f"{ref.gcfg.vocab_size}) differs from the policy's ({run.tok.hash[:12]}, "
                         f"{run.gcfg.vocab_size}); a KL compares next-token distributions over the same ids")
    return ref


@torch.no_grad()
def reply_kl(policy, reference, prompt_ids: list[int], reply_ids: list[list[int]], temperature: float,
             device) -> torch.Tensor:
    """The exact KL(policy || reference) of the next-token distributions (logits / temperature, as RL's log-probs)
    at every token position of the K replies to one prompt, summed -> float64 (2,): (nats, reply tokens).

    Averaged over tokens sampled from the policy this is KL(policy || reference) per token under the policy's own
    sampling: what RL's train/kl estimates from one token per position (model/losses.kl_estimate), here without
    that estimator's noise. Rows are right-padded, which leaves a causal model's earlier logits unchanged."""
    p, lengths = len(prompt_ids), torch.tensor([len(r) for r in reply_ids])  # lengths (K,), <|end|> included
    m = int(lengths.max())
    rows = torch.full((len(reply_ids), p + m), PAD_ID, dtype=torch.long)
    for j, r in enumerate(reply_ids):
        rows[j, : p + len(r)] = torch.tensor(prompt_ids + r)
    rows = rows.to(device)
    # Position p - 1 + t predicts reply token t: logits (K, M, V).
    pol = policy(rows)[:, p - 1 : p - 1 + m].float() / temperature
    ref = reference(rows)[:, p - 1 : p - 1 + m].float() / temperature
    in_reply = torch.arange(m) < lengths[:, None]  # (K, M)
    nats = categorical_kl(pol, ref).cpu()[in_reply].sum().item()
    return torch.tensor([nats, lengths.sum().item()], dtype=torch.float64)


def kl_figures(sums: torch.Tensor, replies: float) -> dict[str, float]:
    """reply_kl's sums over `replies` replies -> kl_to_reference (nats per reply, summed over its tokens) and
    kl_per_token (nats per reply token: the scale of RL's train/kl)."""
    nats, tokens = sums.tolist()
    return {"kl_to_reference": nats / replies, "kl_per_token": nats / tokens}


def load_judge(run: LoadedRun, run_dir: str) -> RewardModelScorer:
    """--judge: a reward model run that shares the policy's tokenizer (refused otherwise, as --rl.reward_model)."""
    judge = RewardModelScorer(run_dir, run.tok, run.gcfg.block_size, where="--judge")
    judge.build(run.device, lambda m: m)
    return judge


def preference_batches(run: LoadedRun, source: str, args, info) -> tuple[list[dict], int, str]:
    """This rank's share of the pairs as padded batches, each pair exactly once (global `index` kept)."""
    check_synthetic_flags(source, args)
    examples, label, n_dropped = [], [], 0
    for split in SPLITS[args.split or "val"]:
        seed, n = synthetic_draw(run, split, args)
        ex, stats = load_preferences(source, split, run.tok, run.gcfg.block_size, seed=seed, n_synthetic=n,
                                     cache_dir=hf_cache_dir(run.cfg))
        examples += ex[: args.max_examples or None]
        label.append(stats["source"])
        n_dropped += stats["n_dropped"]
    if n_dropped:
        print0(f"preference data: {n_dropped} pairs dropped (no completion token left within block_size)")
    mine = list(range(info.rank, len(examples), info.world_size))
    batches = []
    for i in range(0, len(mine), args.batch_size):
        idx = mine[i: i + args.batch_size]
        batch = PreferenceBatcher([examples[j] for j in idx], len(idx), shuffle=False).next_batch()
        batch["index"] = torch.tensor(idx, dtype=torch.long)
        batches.append({k: v.to(run.device) for k, v in batch.items()})
    return batches, len(examples), " + ".join(label)


def reference_path(run: LoadedRun, given: str | None) -> str | None:
    """--reference, else the exact checkpoint the run started from (recorded by the trainer), else its --init-from."""
    if given:
        return given
    exact = run.ckpt.get("init_from_checkpoint")
    if exact and Path(exact).is_file():
        return exact
    init_from = run.ckpt.get("init_from") or run.cfg.init_from
    if init_from and not Path(init_from).exists():
        raise ValueError(f"the run's reference {init_from!r} (its --init-from) is not found from {os.getcwd()}; "
                         "give --reference RUN_DIR")
    return init_from or None


def pref_figures(run: LoadedRun, source: str, args, info) -> tuple[dict, str]:
    batches, n, label = preference_batches(run, source, args, info)
    d = run.cfg.dpo
    ref_path = reference_path(run, args.reference)
    figures: dict = {"pairs": n, "beta": d.beta}
    bar = tqdm(batches, desc="preference", unit="batch", disable=not info.is_main)
    if ref_path is not None:
        ref = load_run(ref_path, str(run.device), run.precision)
        if ref.tok.hash != run.tok.hash:
            raise ValueError(f"--reference {ref_path} uses another tokenizer than {run.ckpt['path']}")
        objective = DPO(d.beta, d.loss_type, d.label_smoothing, reference=ref.model)
        f = preference_figures(run.model, objective, bar, run.autocast)
        figures.update({"preference_accuracy": f["rewards/accuracies"], "reward_margin": f["rewards/margins"],
                        "chosen_reward": f["rewards/chosen"], "rejected_reward": f["rewards/rejected"],
                        "preference_loss": f["loss"], "reference": ref.ckpt["path"]})
    else:  # no reference: log-probs of the model alone (a zero reference leaves the policy's log-probs as they are)
        print0("preference: no reference model (the run has no --init-from; give --reference RUN_DIR): only the "
               "reference-free log-prob comparison is measured")
        zeros = {"val": torch.zeros(n, 2)}
        objective = DPO(d.beta, d.loss_type, d.label_smoothing, ref_cache=zeros)
        f = preference_figures(run.model, objective, bar, run.autocast)
    figures.update({"logp_accuracy": f["logps/accuracies"], "logp_margin": f["logps/chosen"] - f["logps/rejected"],
                    "chosen_logp": f["logps/chosen"], "rejected_logp": f["logps/rejected"]})
    return figures, label


def samples(run: LoadedRun, prompts: list[str], args) -> list[dict]:
    chat_mode = args.chat if args.chat is not None else STAGES[run.cfg.stage].chat
    g = torch.Generator(device=run.device).manual_seed(args.seed)
    return [{"prompt": p, "completion": run.generate_text(p, args.max_new_tokens, args.temperature, args.top_k,
                                                          None, chat_mode, g)} for p in prompts]


def reward_model_result(run: LoadedRun, args, info) -> dict:
    """A reward model (stage rm): its scores on pairs (preference_accuracy: share of pairs scored chosen > rejected,
    reward_margin: mean r_chosen - r_rejected, preference_loss: Bradley-Terry with the records' margins) or on rated
    completions (reward_mse; a run trained with rm.standardize against the ratings standardised by its own training
    split's mean and std, the units it was trained in), on --data or --preference-data
    (pairs) or the run's own data; the run's rm.data says which kind a source holds."""
    if args.chat_data or args.prompt or args.choices:
        raise ValueError(f"{run.ckpt['path']} is a reward model: it scores pairs or rated completions; --chat-data, "
                         "--choices and --prompt need a policy run")
    if args.data and args.preference_data:
        raise ValueError("give one of --data and --preference-data")
    source = args.preference_data or args.data or run.cfg.data.source
    kind = "pairs" if args.preference_data else run.cfg.rm.data
    check_synthetic_flags(source, args)
    t0 = time.perf_counter()
    examples, labels = [], []
    for split in SPLITS[args.split or "val"]:
        seed, n = synthetic_draw(run, split, args)
        ex, stats = load_reward_data(kind, source, split, run.tok, run.gcfg.block_size, seed, n, hf_cache_dir(run.cfg))
        examples += ex[: args.max_examples or None]
        labels.append(stats["source"])
    if kind == "ratings" and run.cfg.rm.standardize:  # in the units the model was trained in
        train, _ = load_reward_data(kind, run.cfg.data.source, "train", run.tok, run.gcfg.block_size,
                                    run.cfg.train.seed, run.cfg.data.synthetic_train, hf_cache_dir(run.cfg))
        examples = standardize_scores(examples, *score_stats(train))
    objective = PairwiseReward() if kind == "pairs" else RatingRegression()
    names = ("loss",) + objective.metric_names
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=run.device)
    mine = examples[info.rank :: info.world_size]  # a plain module on each rank: no collective per forward
    for start in range(0, len(mine), args.batch_size):
        batch = RewardBatcher(mine[start : start + args.batch_size], len(mine[start : start + args.batch_size]),
                              shuffle=False).next_batch()
        batch = {k: v.to(run.device) for k, v in batch.items()}
        with torch.no_grad(), run.autocast:
            loss_sum, metrics = objective(run.model, batch)
        row = [loss_sum, *(metrics[k] for k in objective.metric_names), objective.count(batch)]
        sums += torch.stack([v.double() for v in row])
    distributed.all_reduce(sums)
    n = sums[-1].item()
    f = {name: sums[i].item() / max(n, 1) for i, name in enumerate(names)}
    if kind == "pairs":
        figures = {"preference_accuracy": f["accuracy"], "reward_margin": f["margin"], "preference_loss": f["loss"],
                   "pairs": int(n)}
    else:
        figures = {"reward_mse": f["mse"], "examples": int(n)}
    return {"checkpoint": str(Path(run.ckpt["path"]).resolve()), "step": run.step, "stage": run.cfg.stage,
            "data": {kind: " + ".join(labels)}, **figures, "device": str(run.device), "precision": run.precision,
            "world_size": info.world_size, "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------------------------- multiple choice
@torch.no_grad()
def choice_logprobs(run: LoadedRun, pairs: list[tuple[list[int], list[int]]], batch_size: int, info) -> list[float]:
    """Summed log-prob of each continuation given its context, in batches of right-padded rows (a causal model's
    positions never see the padding after them). A context is cut from the left to leave block_size inputs, as
    the harness does; the continuation is never cut. Rank r scores pairs r, r + world_size, ...; the sum over ranks
    of the (n_pairs,) vectors, each pair filled by one rank, is the single-process vector."""
    T = run.gcfg.block_size
    out = torch.zeros(len(pairs), dtype=torch.float64, device=run.device)
    mine = list(range(info.rank, len(pairs), info.world_size))
    for start in tqdm(range(0, len(mine), batch_size), desc="choices", unit="batch", disable=not info.is_main):
        idx = mine[start: start + batch_size]
        rows = [(pairs[i][0] + pairs[i][1])[-(T + 1):] for i in idx]  # the last token is only a target
        x = torch.zeros(len(rows), max(len(r) for r in rows) - 1, dtype=torch.long, device=run.device)  # (B, L)
        for b, r in enumerate(rows):
            x[b, : len(r) - 1] = torch.tensor(r[:-1])
        with run.autocast:
            logp = torch.log_softmax(run.model(x).float(), dim=-1)  # (B, L, V)
        for b, i in enumerate(idx):
            n_in, k = len(rows[b]) - 1, len(pairs[i][1])  # inputs of the row; continuation tokens (targets)
            targets = torch.tensor(pairs[i][1], device=run.device)
            out[i] = logp[b, torch.arange(n_in - k, n_in, device=run.device), targets].double().sum()
    distributed.all_reduce(out)
    return out.tolist()


def choice_figures(run: LoadedRun, records: list[ChoiceRecord], args, info) -> tuple[dict, str]:
    """mc_accuracy, mc_accuracy_norm, mc_accuracy_bytes over the records of --choices (data/choices.py), and every
    choice's log-likelihood (mc_loglikelihoods, record by record) for comparison with other tools."""
    chat = bool(args.chat)
    if args.chat is None and STAGES[run.cfg.stage].chat:
        print0(f"hint: {run.ckpt['path']} is a chat-tuned ({run.cfg.stage}) run; the choices are scored as plain "
               "text after the question: --chat scores them as its reply to the question as a user turn (what "
               "lm_eval --apply_chat_template does)")
    if run.precision != "fp32":
        print0(f"note: the choices are scored under {run.precision} autocast, lm_eval scores the exported model in "
               "fp32: --precision fp32 gives its log-likelihoods")
    pairs = encode_pairs(records, run.tok, chat, run.gcfg.block_size, args.choices)
    flat = choice_logprobs(run, pairs, args.batch_size, info)
    logprobs, at = [], 0
    for rec in records:
        logprobs.append(flat[at: at + len(rec.choices)])
        at += len(rec.choices)
    figures = {**mc_accuracies(records, logprobs), "mc_records": len(records), "mc_loglikelihoods": logprobs}
    return figures, f"{args.choices} ({len(records)} records, {'chat' if chat else 'plain'} format)"


# ----------------------------------------------------------------------------------------------- the program
def evaluate(args) -> tuple[dict, LoadedRun, distributed.DistInfo]:
    """Every figure asked for, as one dict (identical on every rank)."""
    info = distributed.init(DistSection(), "cuda" if args.device.startswith("cuda") else args.device)
    device = args.device if args.device.startswith("cuda:") and not info.distributed else str(info.device)
    choices = load_choices(args.choices) if args.choices else None  # every record checked before model work
    run = load_run(args.checkpoint, device, args.precision)
    if isinstance(run.model, RewardModel):
        if args.samples_per_prompt:
            raise ValueError(f"--samples-per-prompt: {run.ckpt['path']} is a reward model (--stage rm), which scores "
                             "replies and writes none; sample a policy run (SFT, DPO or RL)")
        return reward_model_result(run, args, info), run, info
    if args.text_column is None:
        args.text_column = run.cfg.data.text_column
    todo = plan(args, run)
    if args.samples_per_prompt and "chat" not in todo:
        raise ValueError("--samples-per-prompt samples replies to chat prompts: give --chat-data SOURCE (a "
                         f"{run.cfg.stage!r} run measures no chat data by default)")
    t0 = time.perf_counter()
    result: dict = {"checkpoint": str(Path(run.ckpt["path"]).resolve()), "step": run.step, "stage": run.cfg.stage,
                    "data": {}}
    if "text" in todo:
        figures, result["data"]["text"] = text_figures(run, todo["text"], args, info)
        result.update(figures)
    if "chat" in todo:
        items, result["data"]["chat"] = chat_items(todo["chat"], args, run)
        result.update(accuracy_figures(run, items, info))
        if args.samples_per_prompt:
            with run.autocast:
                result.update(sampled_figures(run, items, args, info))
    if "preference" in todo:
        figures, result["data"]["preference"] = pref_figures(run, todo["preference"], args, info)
        result.update(figures)
    if choices is not None:
        figures, result["data"]["choices"] = choice_figures(run, choices, args, info)
        result.update(figures)
    if args.prompt:
        result["samples"] = samples(run, args.prompt, args)
    result.update({"device": str(run.device), "precision": run.precision, "world_size": info.world_size,
                   "seconds": round(time.perf_counter() - t0, 3)})
    return result, run, info


def print_table(result: dict) -> None:
    rows = []
    for k, v in result.items():
        if k in ("samples", "data", "accuracy_by_task", "sampled_by_task", "mc_loglikelihoods"):
            continue
        rows.append((k, f"{v:.4f}" if isinstance(v, float) else str(v)))
    for k, v in result.get("accuracy_by_task", {}).items():
        rows.append((f"accuracy/{k}", f"{v:.4f}"))
    for task, figures in result.get("sampled_by_task", {}).items():
        rows += [(f"{name}/{task}", f"{v:.4f}") for name, v in figures.items()]
    for kind, label in result["data"].items():
        rows.append((f"data/{kind}", label))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    for s in result.get("samples", []):
        print(f"--- {s['prompt']!r} ->\n{s['completion']}")


def scalars(result: dict) -> dict[str, float]:
    """The numeric figures as eval/ tags (per-task accuracies as eval/accuracy/TASK)."""
    skip = {"step", "world_size", "seconds"}
    out = {f"eval/{k}": float(v) for k, v in result.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}
    out.update({f"eval/accuracy/{t}": v for t, v in result.get("accuracy_by_task", {}).items()})
    out.update({f"eval/{name}/{t}": v for t, figures in result.get("sampled_by_task", {}).items()
                for name, v in figures.items()})
    return out


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("checkpoint", metavar="RUN_DIR", help="run folder (its newest checkpoint) or a checkpoint file")
    p.add_argument("--data", metavar="SOURCE", help="a source of the data pipeline; its kind is read from its fields")
    p.add_argument("--chat-data", metavar="SOURCE",
                   help="instruction data with reference answers (`synthetic`: the built-in tasks)")
    p.add_argument("--preference-data", metavar="SOURCE",
                   help="prompt/chosen/rejected pairs (`synthetic`: the built-in pairs)")
    p.add_argument("--choices", metavar="FILE.jsonl",
                   help="multiple-choice records (question or context, choices, answer) scored by log-likelihood")
    p.add_argument("--split", choices=tuple(SPLITS), default=None,
                   help="which split of each source (default: val of the run's own data and of chat and preference "
                        "data; all of a text source the run did not train on); --max-tokens/--max-examples apply "
                        "per split")
    p.add_argument("--text-column", metavar="NAME", help="column of tabular text sources (default: the run's)")
    p.add_argument("--max-tokens", type=float, default=0, metavar="N",
                   help="score at most this many text tokens (0 = all)")
    p.add_argument("--max-examples", type=int, default=0, metavar="N",
                   help="at most this many chat examples / pairs (0 = all)")
    p.add_argument("--synthetic-size", type=int, default=0, metavar="N",
                   help="built-in (`synthetic`) records drawn per split (default: the run's data.synthetic_val / _train)")
    p.add_argument("--synthetic-seed", type=int, default=None, metavar="S",
                   help="seed of the built-in records (default: the run's train.seed): the same prompts for every run")
    p.add_argument("--reference", metavar="RUN_DIR",
                   help="reference for DPO rewards (default: the checkpoint the run started from)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per forward")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="generate a sample for this prompt (repeatable)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="samples answer the prompt as a user turn (default: for SFT and DPO runs); --choices scores "
                        "each choice as the reply to the question as a user turn (default: plain text)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="of the samples; 0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--samples-per-prompt", type=int, default=0, metavar="K",
                   help="also sample K replies per chat prompt: sampled_accuracy (mean@K), pass_at_k, all_equal_share")
    p.add_argument("--samples-temperature", type=float, default=1.0, metavar="T",
                   help="temperature of those K replies (default 1.0, the RL stage's; 0 = greedy)")
    p.add_argument("--judge", metavar="RM_RUN_DIR",
                   help="a reward model also scores the K replies: best_of_k_accuracy, judge_pair_accuracy")
    p.add_argument("--kl-reference", metavar="RUN_DIR",
                   help="the exact KL of the K replies' next-token distributions to this run's (an RL run's start, "
                        "or the SFT run before several RL rounds): kl_to_reference, kl_per_token")
    p.add_argument("--seed", type=int, default=1337, help="of the samples and the sampled replies")
    p.add_argument("--json", metavar="FILE", help="write every figure to this JSON file")
    p.add_argument("--tensorboard", action="store_true", help="log the figures under eval/ in the run's TensorBoard")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on a bf16-capable GPU, else fp32; fp32 for lm_eval's --choices figures")
    args = p.parse_args(argv)
    args.max_tokens = int(args.max_tokens)
    if args.max_tokens < 0 or args.max_examples < 0 or args.batch_size < 1:
        raise ValueError("--max-tokens and --max-examples must be >= 0, --batch-size >= 1")
    if args.judge and args.samples_per_prompt < 2:
        raise ValueError("--judge ranks the sampled replies of each prompt: give --samples-per-prompt K >= 2")
    if args.kl_reference and (args.samples_per_prompt < 1 or args.samples_temperature <= 0):
        raise ValueError("--kl-reference measures the KL on sampled replies: give --samples-per-prompt K >= 1 and "
                         f"--samples-temperature > 0 (got {args.samples_per_prompt} and {args.samples_temperature})")
    if args.samples_per_prompt < 0 or args.samples_temperature < 0:
        raise ValueError(f"--samples-per-prompt={args.samples_per_prompt} and --samples-temperature="
                         f"{args.samples_temperature} must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        if args.tensorboard and not (Path(args.checkpoint).is_dir()
                                     or Path(args.checkpoint).parent.name == "checkpoints"):
            raise ValueError("--tensorboard writes into the run folder: give a run folder or one of its checkpoints")
        result, run, info = evaluate(args)
        if info.is_main:
            print_table(result)
            if args.json:
                path = Path(args.json)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(result, indent=2) + "\n")
                os.replace(tmp, path)
                print(f"wrote {path}")
            if args.tensorboard:
                monitor = Monitor(run.run_dir, enabled=True, tensorboard=True)
                monitor.scalars(run.step, scalars(result))
                for s in result.get("samples", []):
                    monitor.text("eval/sample", f"{s['prompt']}\n-> {s['completion']}", run.step)
                monitor.close()
                print(f"logged {len(scalars(result))} eval/ figures at step {run.step} to {run.run_dir}")
        return result
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_script(main)
