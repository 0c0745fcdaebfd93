"""Batched, left-padded, keyed generation (model/generation.py) and GPT's key-padding mask.

A tiny GPT built here (fp32, CPU), with a large init so that greedy continuations vary from token to token (at the
default init they repeat one token, and then any mask bug would go unseen)."""

import math

import pytest
import torch

from model import GPT, GPTConfig, KVCache
from model.generation import Rollout, generate_rollouts, gumbel_noise, left_pad

ARCH_CFGS = {
    "modern": dict(arch="modern", vocab_size=61, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32),
    "gpt2": dict(arch="gpt2", vocab_size=61, block_size=40, n_layer=2, n_head=4, n_embd=32, bias=True),
}
PAD = 0
PROMPTS = [[5, 17, 3, 44, 9, 21, 8], [12, 30], [7, 7, 51, 2], [40]]  # lengths 7, 2, 4, 1


def make(arch: str, **kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**ARCH_CFGS[arch], "init_std": 0.3, **kw})).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, as tests/test_model.py does
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def completion_of(rollout: Rollout, row: int) -> list[int]:
    """The kept completion tokens of one row."""
    tokens = rollout.input_ids[row, rollout.prompt_len :]
    return tokens[rollout.completion_mask[row]].tolist()


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------- the key-padding mask
def test_left_pad_layout():
    ids, mask, pos = left_pad([[4, 5, 6], [9]], pad_id=1, device="cpu")
    assert ids.tolist() == [[4, 5, 6], [1, 1, 9]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_padded_forward_equals_unpadded_rows(arch):
    """Left-padded prompts with pad_mask and per-row positions: at every real position the logits equal the row's
    own unpadded forward, without a cache and with one (padded prefill, then decode steps); no NaN anywhere (the
    padding queries attend to themselves)."""
    model = make(arch)
    ids, mask, pos = left_pad(PROMPTS, PAD, "cpu")  # (4, 7)
    n, p = ids.shape
    with torch.no_grad():
        full = model(ids, pos, pad_mask=mask)  # (4, 7, V)
        assert torch.isfinite(full).all()
        for i, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt]))[0]  # (L, V)
            torch.testing.assert_close(full[i, p - len(prompt) :], alone, atol=1e-5, rtol=0)

        # KV cache: padded prefill, then 3 decode steps, then a 2-token chunk (the lower-right causal mask).
        cache = KVCache(model.cfg, n, p + 5, "cpu", torch.float32)
        steps = [model(ids, pos, None, cache, pad_mask=mask)]
        new = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25], [31, 32, 33, 34, 35], [41, 42, 43, 44, 45]])
        lengths = mask.sum(1)
        keys_real = mask
        for t in range(3):
            keys_real = torch.cat([keys_real, torch.ones(n, 1, dtype=torch.bool)], dim=1)
            steps.append(model(new[:, t : t + 1], (lengths + t)[:, None], None, cache, pad_mask=keys_real))
        keys_real = torch.cat([keys_real, torch.ones(n, 2, dtype=torch.bool)], dim=1)
        chunk_pos = torch.stack([lengths + 3, lengths + 4], dim=1)  # (4, 2)
        steps.append(model(new[:, 3:5], chunk_pos, None, cache, pad_mask=keys_real))
        inc = torch.cat(steps, dim=1)  # (4, 12, V)
        assert torch.isfinite(inc).all()
        for i, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt + new[i].tolist()]))[0]  # (L + 5, V)
            torch.testing.assert_close(inc[i, p - len(prompt) :], alone, atol=1e-5, rtol=0)


def test_padded_causal_mask_by_hand():
    """Two cached columns then three queries; row 0 is left-padded by three (columns 0-2 padding, so the query at
    column 2 is a padding query), row 1 has a padding key at column 3 (a stopped row's pad): causal lower-right,
    real keys only, and the diagonal always allowed, so no query row is all False (an all-masked SDPA row is NaN
    on some kernels and versions; this CPU build returns zeros, so the rule is checked here, on the mask)."""
    from model.gpt import padded_causal_mask

    pad_mask = torch.tensor([[False, False, False, True, True], [True, True, True, False, True]])
    mask = padded_causal_mask(pad_mask, past=2, t=3)
    assert mask.shape == (2, 1, 3, 5)
    assert mask[0, 0].int().tolist() == [[0, 0, 1, 0, 0],  # padding query at column 2: itself only
                                         [0, 0, 0, 1, 0],
                                         [0, 0, 0, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 0, 0],
                                         [1, 1, 1, 1, 0],  # the padding query at column 3 sees itself
                                         [1, 1, 1, 0, 1]]  # a real query skips the padding key


def test_padding_mask_refuses_packed_rows():
    model = make("modern")
    ids, mask, pos = left_pad(PROMPTS, PAD, "cpu")
    with pytest.raises(AssertionError, match="doc_ids"):
        model(ids, pos, torch.zeros_like(ids), pad_mask=mask)


# ---------------------------------------------------------------- the noise
def test_gumbel_noise_is_a_pure_function_of_key_and_step():
    keys = torch.tensor([3, -7, 2**40 + 5, 3 + 2**32], dtype=torch.int64)
    rng = torch.get_rng_state()
    a = gumbel_noise(keys, 4, 50)
    assert torch.equal(torch.get_rng_state(), rng)  # no torch random state read or changed
    assert a.shape == (4, 50) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, gumbel_noise(keys, 4, 50))  # deterministic
    # Row i depends on key i only: alone, or among other keys in another order, it is the same row.
    assert torch.equal(gumbel_noise(keys[2:3], 4, 50)[0], a[2])
    assert torch.equal(gumbel_noise(torch.tensor([99, 3]), 4, 50)[1], a[0])
    # Different keys (also ones differing only in the high 32 bits: 3 and 3 + 2^32) and steps give different noise.
    assert (a[0] != a[3]).all() and (a[0] != a[1]).all()
    assert (gumbel_noise(keys, 5, 50) != a).all()


def test_gumbel_noise_moments():
    """Over 200000 draws the mean is Euler's gamma and the variance pi^2 / 6, within 4 standard errors."""
    g = gumbel_noise(torch.arange(40000), 0, 5).double().flatten()  # 200000 values
    n = g.numel()
    var = math.pi**2 / 6
    assert abs(g.mean().item() - 0.5772156649) < 4 * math.sqrt(var / n)
    # Var of the sample variance ~ (mu4 - sigma^4) / n with the Gumbel's excess kurtosis 12/5: mu4 = (3 + 12/5) var^2
    assert abs(g.var().item() - var) < 4 * math.sqrt((3 + 2.4 - 1) * var**2 / n)


def test_gumbel_max_samples_softmax_over_temperature():
    """argmax(logits / T + noise) over 20000 keys: each token's frequency within 4 standard errors of
    softmax(logits / T), sqrt(p (1 - p) / n) (at most 0.0035 here)."""
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    temperature, n = 0.7, 20000
    probs = (logits / temperature).softmax(-1).double()
    picks = (logits / temperature + gumbel_noise(torch.arange(n) * 7919 + 11, 3, 5)).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / n
    bound = 4 * (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() < bound).all(), (freq, probs)


# ---------------------------------------------------------------- rollouts
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_batched_greedy_equals_each_prompt_decoded_alone(arch):
    model = make(arch)
    stop = 0
    # The stop token: one the longest prompt's unpadded greedy decode emits after a few tokens, so some rows stop
    # early and others run to max_new_tokens.
    first = GPT.generate(model, torch.tensor([PROMPTS[0]]), 12, temperature=0)[0, len(PROMPTS[0]) :].tolist()
    assert len(set(first)) > 3, first  # a varied continuation, or the comparison would be weak
    stop = first[4]
    rollout = generate_rollouts(model, PROMPTS, 12, 0.0, torch.arange(4), stop_token=stop, pad_id=PAD)
    lengths = set()
    for i, prompt in enumerate(PROMPTS):
        alone = GPT.generate(model, torch.tensor([prompt]), 12, temperature=0, stop_tokens=[stop])
        expected = alone[0, len(prompt) :].tolist()
        assert completion_of(rollout, i) == expected, (i, completion_of(rollout, i), expected)
        lengths.add(len(expected))
    assert len(lengths) > 1  # rows of different completion lengths were in the batch


@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_rollout_fields_reproduce_the_tokens_under_teacher_forcing(arch):
    """One forward over the rollout (input_ids, positions, pad_mask; no cache) predicts every kept greedy token
    from the column before it: the fields describe the sequences the sampler saw, as the RL update reads them."""
    model = make(arch)
    rollout = generate_rollouts(model, PROMPTS, 9, 0.0, torch.arange(4), stop_token=-1, pad_id=PAD)
    p = rollout.prompt_len
    with torch.no_grad():
        logits = model(rollout.input_ids, rollout.positions, pad_mask=rollout.pad_mask)  # (N, P + M, V)
    predicted = logits[:, p - 1 : -1].argmax(-1)  # (N, M)
    completion = rollout.input_ids[:, p:]
    assert torch.equal(predicted[rollout.completion_mask], completion[rollout.completion_mask])
    for i, prompt in enumerate(PROMPTS):  # positions count each row's real tokens from 0
        assert rollout.positions[i][rollout.pad_mask[i]].tolist() == list(range(len(prompt) + 9))


def test_sampled_completion_depends_on_its_prompt_and_key_only():
    model = make("modern")
    keys = torch.tensor([101, 202, 303, 404])
    base = generate_rollouts(model, PROMPTS, 10, 1.0, keys, stop_token=-1, pad_id=PAD)
    # The same (prompt, key) at another row, with other neighbours, and with a different padded length (the longest
    # prompt left out: P drops from 7 to 4).
    other = generate_rollouts(model, [PROMPTS[3], PROMPTS[1], PROMPTS[2]], 10, 1.0, keys[[3, 1, 2]],
                              stop_token=-1, pad_id=PAD)
    alone = generate_rollouts(model, [PROMPTS[1]], 10, 1.0, keys[[1]], stop_token=-1, pad_id=PAD)
    twice = generate_rollouts(model, [PROMPTS[1], PROMPTS[0], PROMPTS[1]], 10, 1.0, torch.tensor([202, 101, 999]),
                              stop_token=-1, pad_id=PAD)
    assert completion_of(other, 0) == completion_of(base, 3)
    assert completion_of(other, 1) == completion_of(base, 1) == completion_of(alone, 0) == completion_of(twice, 0)
    assert completion_of(other, 2) == completion_of(base, 2)
    assert completion_of(twice, 1) == completion_of(base, 0)
    # The key matters: the same prompt under another key samples another completion; greedy is not what we saw.
    assert completion_of(twice, 2) != completion_of(twice, 0)
    greedy = generate_rollouts(model, PROMPTS, 10, 0.0, keys, stop_token=-1, pad_id=PAD)
    assert any(completion_of(greedy, i) != completion_of(base, i) for i in range(4))


@pytest.mark.parametrize("arch,option", [("modern", {}), ("gpt2", {}), ("modern", {"bigram_buckets": 50})],
                         ids=["modern", "gpt2", "modern-bigram"])
def test_repeated_prompts_share_one_prefill_and_sample_as_if_decoded_alone(arch, option):
    """An RL batch holds each prompt G times. The prefill runs once per distinct prompt (its batch counted by a
    hook: 3 rows for 12), its keys, values and last logits copied to the copies' rows, and every row samples what
    its (prompt, key) samples alone; the layout fields are those of the rows padded one by one (the bigram
    embedding's previous token, also kept by the cache, is copied too)."""
    model = make(arch, **option)
    distinct = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    prompts = [prompt for prompt in distinct for _ in range(4)]  # (12,) rows: 3 prompts x 4 copies
    keys = torch.arange(12) * 7 + 1
    batches = []
    hook = model.register_forward_hook(lambda module, args, out: batches.append(args[0].shape))
    shared = generate_rollouts(model, prompts, 8, 1.0, keys, stop_token=-1, pad_id=PAD)
    hook.remove()
    assert batches[0] == (3, 7) and all(shape == (12, 1) for shape in batches[1:])  # prefill over the 3 distinct
    assert shared.forward_tokens == 3 * 7 + 7 * 12  # what the RL stage's FLOP count reads: prefill, 7 decode steps
    ids, pad_mask, positions = left_pad(prompts, PAD, "cpu")
    assert torch.equal(shared.input_ids[:, :7], ids) and torch.equal(shared.pad_mask[:, :7], pad_mask)
    assert torch.equal(shared.positions[:, :7], positions)
    samples = []
    for i, prompt in enumerate(prompts):
        alone = generate_rollouts(model, [prompt], 8, 1.0, keys[[i]], stop_token=-1, pad_id=PAD, pad_to=7)
        assert completion_of(shared, i) == completion_of(alone, 0), i
        samples.append(tuple(completion_of(alone, 0)))
    assert len(set(samples[:4])) > 1  # the copies of a prompt sampled different completions: the keys mattered


def test_sampled_first_tokens_follow_softmax_over_temperature():
    """One prompt in 6000 rows, one new token each at temperature 0.5: each token's frequency is within 4 standard
    errors, sqrt(p (1 - p) / n), of softmax(logits / 0.5) of the prompt's last position (tokens expected fewer than
    5 times pooled into one bin, where the normal approximation of the error holds)."""
    model = make("modern")
    temperature, n = 0.5, 6000
    prompt = PROMPTS[2]
    with torch.no_grad():
        probs = (model(torch.tensor([prompt]))[0, -1].double() / temperature).softmax(-1)  # (V,)
    assert probs.max() < 0.9  # a spread distribution: a temperature bug would show
    rollout = generate_rollouts(model, [prompt] * n, 1, temperature, torch.arange(n) + 10**6, stop_token=-1,
                                pad_id=PAD)
    freq = torch.bincount(rollout.input_ids[:, -1], minlength=probs.numel()).double() / n
    rare = probs * n < 5
    probs = torch.cat([probs[~rare], probs[rare].sum(0, keepdim=True)])
    freq = torch.cat([freq[~rare], freq[rare].sum(0, keepdim=True)])
    bound = 4 * (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= bound).all(), (freq - probs).abs().max()


def test_stop_token_masks_the_rest_and_generation_ends_early():
    """Decoded without a stop token (stop_token=-1 never occurs), then with one: each row is the same up to its
    first stop token (kept, completion_mask True), then pad_id with completion_mask False, pad_mask False and
    position 0. Once every row has stopped, decoding ends (M < max_new_tokens) unless fixed_length."""
    model = make("modern")
    keys = torch.tensor([5, 6, 7, 8])
    free = generate_rollouts(model, PROMPTS, 30, 1.0, keys, stop_token=-1, pad_id=PAD)
    p = free.prompt_len
    raw = free.input_ids[:, p:].tolist()  # (4, 30)
    assert free.completion_mask.all() and len(raw[0]) == 30
    # The stop token: of the tokens every row emits, the one all rows have emitted soonest.
    shared = set(raw[0]).intersection(*raw[1:])
    stop = min(shared, key=lambda tok: max(row.index(tok) for row in raw))
    cut = [row.index(stop) + 1 for row in raw]  # kept tokens per row, through the first stop
    assert len(set(cut)) > 1, cut  # rows stop at different steps

    forwards = []  # the rows of each forward
    hook = model.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[0]))
    stopped = generate_rollouts(model, PROMPTS, 30, 1.0, keys, stop_token=stop, pad_id=PAD)
    n_early, rows_early = len(forwards), list(forwards)
    forwards.clear()
    fixed = generate_rollouts(model, PROMPTS, 30, 1.0, keys, stop_token=stop, pad_id=PAD, fixed_length=True)
    hook.remove()

    m = max(cut)
    assert stopped.input_ids.shape == (4, p + m) and m < 30
    assert n_early == m  # one prefill and m - 1 decode steps
    # Once half the rows held have stopped, the decode steps leave them out: after step s a forward holds the rows
    # that had not stopped when the held rows were last halved.
    held = 4
    for s, rows in enumerate(rows_early[1:]):
        running = sum(c > s + 1 for c in cut)  # rows that have not stopped after step s
        if running <= held // 2:
            held = running
        assert rows == held, (s, rows_early, cut)
    assert held < 4
    assert stopped.forward_tokens == 4 * p + sum(rows_early[1:])
    assert len(forwards) == 30 and fixed.input_ids.shape == (4, p + 30)  # exactly max_new_tokens steps
    for r in (stopped, fixed):
        cols = r.input_ids.shape[1] - p
        for i, c in enumerate(cut):
            assert r.input_ids[i, p : p + c].tolist() == raw[i][:c]
            assert r.input_ids[i, p + c :].tolist() == [PAD] * (cols - c)
            assert r.completion_mask[i].tolist() == [True] * c + [False] * (cols - c)
            assert r.pad_mask[i, p:].tolist() == r.completion_mask[i].tolist()
            assert r.positions[i, p + c :].tolist() == [0] * (cols - c)
            assert r.positions[i, p : p + c].tolist() == list(range(len(PROMPTS[i]), len(PROMPTS[i]) + c))


def test_generation_runs_in_eval_mode_and_restores_the_mode():
    """With dropout 0.5, train mode would make greedy decoding random; generate_rollouts decodes in eval mode and
    hands the model back in the mode it found it in."""
    model = make("modern", dropout=0.5)
    expected = generate_rollouts(model, PROMPTS, 8, 0.0, torch.arange(4), stop_token=-1, pad_id=PAD).input_ids
    assert not model.training
    model.train()
    got = generate_rollouts(model, PROMPTS, 8, 0.0, torch.arange(4), stop_token=-1, pad_id=PAD).input_ids
    assert model.training and torch.equal(got, expected)


def test_bad_requests_are_refused_with_the_numbers():
    model = make("modern")
    keys = torch.arange(4)
    with pytest.raises(ValueError, match=r"7 tokens\) \+ max_new_tokens=34 = 41 exceeds block_size=40"):
        generate_rollouts(model, PROMPTS, 34, 1.0, keys, stop_token=1, pad_id=PAD)
    generate_rollouts(model, PROMPTS, 33, 1.0, keys, stop_token=1, pad_id=PAD)  # 7 + 33 = 40 fits
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_rollouts(model, [[3], [], [4]], 4, 1.0, torch.arange(3), stop_token=1, pad_id=PAD)
    with pytest.raises(ValueError, match="temperature=-0.5"):
        generate_rollouts(model, PROMPTS, 4, -0.5, keys, stop_token=1, pad_id=PAD)
    with pytest.raises(ValueError, match=r"row_keys of shape \(3,\)"):
        generate_rollouts(model, PROMPTS, 4, 1.0, torch.arange(3), stop_token=1, pad_id=PAD)


@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_stream_yields_generates_tokens_and_runs_no_forward_it_is_not_asked_for(arch):
    # GPT.generate collects GPT.stream (chat.py prints it token by token): a seeded stream gives generate's tokens,
    # past the context (the cache rebuilt from the last half), and a caller that stops after k tokens has paid for
    # the prefill and k - 1 single-token forwards, nothing more.
    model = make(arch)
    idx = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])  # (2, 7)
    want = model.generate(idx, 50, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    got = torch.stack(list(model.stream(idx, 50, 1.0, 10, None, torch.Generator().manual_seed(3))), dim=1)
    assert want.shape == (2, 7 + 50) and torch.equal(got, want[:, 7:])  # 57 tokens > block_size 40
    forwards = []
    hook = model.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[1]))
    try:
        tokens = model.stream(idx, 50, 0.0)
        for _ in range(3):
            next(tokens)
    finally:
        hook.remove()
    assert forwards == [7, 1, 1]
