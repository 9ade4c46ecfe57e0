"""KV cache, sampling and the token generator, checked against full recomputation and transformers."""

import math
import warnings

import pytest
import torch

from gptlab import generate as generate_module
from gptlab import hf
from gptlab.errors import UserError
from gptlab.generate import KVCache, PromptWarning, generate, generate_ids, sample_next

PROMPT = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # "Hello, I'm a language model,"


def greedy_by_recompute(model, prompt, n):
    """Greedy decoding the slow way: the whole sequence through the model at every step."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------- the cache

def test_kv_cache_stores_and_returns_everything_so_far():
    cache = KVCache(n_layer=2, batch_size=3, n_head=2, head_dim=4, max_len=6)
    k1, v1 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    k, v = cache.update(1, k1, v1)
    assert k.shape == (3, 2, 4, 4) and torch.equal(k, k1) and torch.equal(v, v1)
    cache.pos = 4
    k2, v2 = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    k, v = cache.update(1, k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    cache.pos = 5
    cache.keep(torch.tensor([2, 0]))  # rows 2 and 0 become rows 0 and 1
    assert torch.equal(cache.k[1, :2, :, :5], torch.cat([k1, k2], dim=2)[[2, 0]])
    with pytest.raises(ValueError, match="positions"):
        cache.update(0, torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))


# ----------------------------------------------------------------------------- sampling

def test_greedy_and_top_k_one_are_argmax():
    logits = torch.randn(4, 1000)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), logits.argmax(-1))


def test_top_k_keeps_only_the_k_largest():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 500, generator=g).expand(4000, -1)
    drawn = set(sample_next(logits, temperature=3.0, top_k=5, generator=g).tolist())
    assert drawn == set(logits[0].topk(5).indices.tolist())


@pytest.mark.parametrize("candidates", [1024, 2])  # the partial top-k shortcut, and the full sort
@pytest.mark.parametrize("top_p, allowed", [(0.4, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_holding_p(monkeypatch, candidates, top_p, allowed):
    monkeypatch.setattr(generate_module, "_NUCLEUS_CANDIDATES", candidates)
    probs = torch.tensor([0.05, 0.3, 0.5, 0.15])
    order = [2, 1, 3, 0]  # ids by falling probability
    logits = probs.log().expand(4000, -1)
    drawn = set(sample_next(logits, temperature=1.0, top_k=0, top_p=top_p,
                            generator=torch.Generator().manual_seed(0)).tolist())
    assert drawn == {order[i] for i in allowed}


def test_top_k_then_top_p_on_the_renormalised_candidates():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top-2 renormalised is (4/7, 3/7): top_p 0.5 keeps only the first
    drawn = set(sample_next(probs.log().expand(2000, -1), temperature=1.0, top_k=2, top_p=0.5,
                            generator=torch.Generator().manual_seed(0)).tolist())
    assert drawn == {0}


def test_plain_sampling_follows_the_softmax():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    n = 20000
    drawn = sample_next(probs.log().expand(n, -1), temperature=1.0, top_k=0,
                        generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015)
    # temperature 2 flattens: p ** (1/2), renormalised
    drawn = sample_next(probs.log().expand(n, -1), temperature=2.0, top_k=0,
                        generator=torch.Generator().manual_seed(1))
    want = probs.sqrt() / probs.sqrt().sum()
    assert torch.allclose(torch.bincount(drawn, minlength=4).float() / n, want, atol=0.015)


# ----------------------------------------------------------------------------- generation

def test_greedy_with_cache_equals_full_recompute(make_gptlab):
    model = make_gptlab(seed=2, noise=0.2)
    out = generate_ids(model, PROMPT, num_samples=3, max_new_tokens=30, temperature=0, stop_token=None)
    ref = greedy_by_recompute(model, PROMPT, 30)
    assert len(set(ref)) > 10  # not stuck repeating one token, which would prove little
    assert out == [ref, ref, ref]  # every row, including those whose prefill was copied


def test_greedy_equals_transformers_generate(hf_gpt2_dir):
    from transformers import GPT2LMHeadModel

    ref = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    ours = hf.load_hf_dir(hf_gpt2_dir)
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        want = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=40,
                            min_new_tokens=40, pad_token_id=50256)
    want = want[0, len(PROMPT):].tolist()
    assert len(set(want)) > 10
    assert generate_ids(ours, PROMPT, max_new_tokens=40, temperature=0, stop_token=None) == [want]


def test_seed_reproduces_and_samples_differ(make_gptlab):
    model = make_gptlab(seed=3)
    kw = dict(num_samples=4, max_new_tokens=15, temperature=1.0, top_k=50, stop_token=None)
    a = generate_ids(model, PROMPT, seed=123, **kw)
    assert a == generate_ids(model, PROMPT, seed=123, **kw)
    assert a != generate_ids(model, PROMPT, seed=124, **kw)
    assert len({tuple(s) for s in a}) > 1  # samples of one batch are independent draws


def test_padded_ids_are_never_sampled(make_gptlab):
    model = make_gptlab(seed=4, vocab_multiple=128)  # 50257 -> 50304 rows
    with torch.no_grad():
        # the padded rows point along the final hidden state's mean: they would win if not masked
        model.transformer.wte.weight[50257:] = 50.0 * model.transformer.ln_f.bias
    out = generate_ids(model, PROMPT, num_samples=8, max_new_tokens=20, temperature=2.0, top_k=0,
                       seed=0, stop_token=None)
    assert all(0 <= t < 50257 for sample in out for t in sample)


def test_each_sample_stops_at_its_own_stop_token(make_gptlab):
    """Samples leave the batch when they end; the others go on with the right cache rows: every
    token must be one of the top-2 of its own sample's context, recomputed from scratch."""
    model = make_gptlab(seed=5)
    kw = dict(num_samples=6, max_new_tokens=12, temperature=1.0, top_k=2, seed=7)
    free = generate_ids(model, PROMPT, stop_token=None, **kw)
    stop = free[0][2]  # sample 0 says this token by step 3 at the latest
    out = generate_ids(model, PROMPT, stop_token=stop, **kw)
    assert len(out[0]) <= 3 and out[0][-1] == stop
    assert any(len(s) > len(out[0]) for s in out)  # some went on after sample 0 ended
    for s in out:
        assert stop not in s[:-1]
        assert len(s) == 12 or s[-1] == stop
        seq = torch.tensor([PROMPT + s])
        with torch.no_grad():
            logits, _ = model(seq)
        top2 = logits[0, len(PROMPT) - 1:-1].topk(2, dim=-1).indices  # (len(s), 2)
        assert all(t in row for t, row in zip(s, top2.tolist()))


def test_stops_at_end_of_text_by_default(make_gptlab):
    model = make_gptlab(seed=6)
    with torch.no_grad():
        # make <|endoftext|> the clear favourite after any context
        model.transformer.wte.weight[50256] = 50.0 * model.transformer.ln_f.bias
    out = generate_ids(model, PROMPT, num_samples=2, max_new_tokens=10, temperature=0)
    assert out == [[50256], [50256]]


def test_long_prompt_is_cropped_to_leave_max_new_tokens(make_gptlab):
    model = make_gptlab(seed=7, seq_len=32)
    prompt = list(range(1000, 1040))  # 40 tokens > context 32
    with pytest.warns(PromptWarning, match="more than the context of 32; keeping its last 28 so that 5 new"):
        out = generate_ids(model, prompt, max_new_tokens=5, temperature=0, stop_token=None)
    assert out == [greedy_by_recompute(model, prompt[-28:], 5)]  # the 5 asked for, not 1
    # a prompt that fits the context but leaves too little room is cropped the same way
    with pytest.warns(PromptWarning, match="the prompt has 30 tokens; keeping its last 28"):
        out = generate_ids(model, prompt[:30], max_new_tokens=5, temperature=0, stop_token=None)
    assert out == [greedy_by_recompute(model, prompt[2:30], 5)]
    # more new tokens than the context holds: one prompt token, then the context fills up
    with pytest.warns(PromptWarning) as record:
        out = generate_ids(model, prompt, max_new_tokens=40, temperature=0, stop_token=None)
    assert any("only 32 new tokens fit" in str(w.message) for w in record)
    assert out == [greedy_by_recompute(model, prompt[-1:], 32)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits gives no warning
        generate_ids(model, prompt[:28], max_new_tokens=5, temperature=0)


def test_yields_step_by_step(make_gptlab):
    model = make_gptlab(seed=8)
    steps = generate(model, PROMPT, num_samples=2, max_new_tokens=4, temperature=0, stop_token=None)
    first = next(steps)
    assert len(first) == 2 and all(isinstance(t, int) for t in first)
    assert not torch.is_inference_mode_enabled()  # the mode does not leak out between steps
    assert len(list(steps)) == 3


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top-p"),
    (dict(top_p=1.5), "top-p"),
    (dict(top_k=-1), "top-k"),
    (dict(num_samples=0), "num-samples"),
    (dict(max_new_tokens=0), "max-new-tokens"),
])
def test_bad_settings(make_gptlab, kw, message):
    model = make_gptlab()
    with pytest.raises(UserError, match=message):
        generate_ids(model, PROMPT, **kw)


def test_empty_prompt_is_refused(make_gptlab):
    with pytest.raises(UserError, match="empty"):
        generate_ids(make_gptlab(), [])


def test_training_mode_is_restored(make_gptlab):
    model = make_gptlab().train()
    generate_ids(model, PROMPT, max_new_tokens=2)
    assert model.training
