"""Batched evaluation against one-at-a-time, unpadded oracles; stop strings; the response cache."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data.benchmarks import from_items
from fitness.evaluate import (
    EvalSettings,
    Responses,
    choice_scores,
    evaluate,
    evaluate_folder,
    generate,
    response_matrix,
)
from zoo.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    # A random model with a wide init, so its greedy outputs vary from prompt to prompt.
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=4, initializer_range=0.3,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = ["rev:abc=", "cip:hello=", "srt:9", "a", "cnt:b:abcbdbb=", "shf:3:123456789="]


def items():
    gen = [{"id": f"g{i}", "prompt": p, "answer": "x"} for i, p in enumerate(PROMPTS)]
    mc = [{"id": f"m{i}", "prompt": p, "choices": ["a", "bc", "9", "dd1"], "answer": i % 4} for i, p in enumerate(PROMPTS)]
    return gen + mc


def greedy_oracle(model, tok, prompt, n):
    """Plain greedy decoding without cache or padding: re-run the whole sequence each step."""
    ids = tok(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return out


def logprob_oracle(model, tok, prompt, choice):
    ids = tok(prompt)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + c])).logits[0].double(), -1)
    return sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(c))


def test_generation_matches_unbatched_oracle(model, tok):
    texts, counts = generate(model, tok, PROMPTS, max_new_tokens=8, stop=(), batch_size=4)
    for p, t, n in zip(PROMPTS, texts, counts):
        ref = greedy_oracle(model, tok, p, 8)
        assert t == tok.decode(ref, skip_special_tokens=True)
        assert n == len(ref)
    assert len(set(texts)) > 2, "the test model should not answer everything alike"


def test_stop_strings_cut_output(model, tok):
    full, _ = generate(model, tok, PROMPTS, max_new_tokens=8, stop=())
    row = max(range(len(full)), key=lambda i: len(set(full[i])))
    stop_char = full[row][2]  # a character the model is known to emit
    cut, counts = generate(model, tok, PROMPTS, max_new_tokens=8, stop=(stop_char,))
    for p, f, c, n in zip(PROMPTS, full, cut, counts):
        assert c == f.split(stop_char)[0]
        ref = greedy_oracle(model, tok, p, 8)
        # tokens up to and including the one that completes the stop string
        want = next((k + 1 for k in range(len(ref)) if stop_char in tok.decode(ref[: k + 1], skip_special_tokens=True)), len(ref))
        assert n == want
    assert stop_char in full[row] and cut[row] != full[row]


def test_choice_scores_match_oracle(model, tok):
    choices = [["a", "bc", "9", "dd1"]] * len(PROMPTS)
    scores, lengths = choice_scores(model, tok, PROMPTS, choices, batch_size=5)
    for p, s, n in zip(PROMPTS, scores, lengths):
        assert list(n) == [1, 2, 1, 3]
        np.testing.assert_allclose(s, [logprob_oracle(model, tok, p, c) for c in choices[0]], rtol=1e-4, atol=1e-4)


def test_batched_equals_one_by_one(model, tok):
    bench = from_items("t", items())
    for settings in (EvalSettings(max_new_tokens=6), EvalSettings(max_new_tokens=6, mc_norm="mean")):
        big = evaluate(model, tok, bench, settings, batch_size=64, device="cpu")
        one = evaluate(model, tok, bench, settings, batch_size=1, device="cpu")
        assert big.outputs == one.outputs
        assert np.array_equal(big.correct, one.correct)
        assert np.array_equal(big.output_tokens, one.output_tokens)


def test_one_evaluation_split_back_equals_separate_evaluations(model, tok):
    whole = from_items("t", items())
    settings = EvalSettings(max_new_tokens=6)
    sizes = [3, len(whole.items) - 5, 2]
    parts = np.split(np.arange(len(whole.items)), np.cumsum(sizes)[:-1])
    together = evaluate(model, tok, whole, settings, batch_size=64, device="cpu").split(sizes)
    for idx, got in zip(parts, together):
        alone = evaluate(model, tok, [whole.items[i] for i in idx], settings, batch_size=64, device="cpu")
        assert got.item_ids == alone.item_ids and got.outputs == alone.outputs
        assert np.array_equal(got.correct, alone.correct) and np.array_equal(got.output_tokens, alone.output_tokens)
    with pytest.raises(ValueError, match="sizes"):
        evaluate(model, tok, whole, settings, device="cpu").split([1, 1])


def test_mc_prediction_and_normalization(model, tok):
    bench = from_items("t", items())
    r_sum = evaluate(model, tok, bench, EvalSettings(mc_norm="sum"), device="cpu")
    r_mean = evaluate(model, tok, bench, EvalSettings(mc_norm="mean"), device="cpu")
    for k, it in enumerate(bench.items):
        if not it.is_choice:
            continue
        s = np.array([logprob_oracle(model, tok, it.prompt, c) for c in it.choices])
        n = np.array([1, 2, 1, 3])
        assert int(r_sum.outputs[k]) == int(np.argmax(s))
        assert int(r_mean.outputs[k]) == int(np.argmax(s / n))
        assert r_sum.correct[k] == (int(np.argmax(s)) == it.answer)
        assert r_sum.output_tokens[k] == n[int(r_sum.outputs[k])]


def test_generation_correctness_uses_match_rule(model, tok):
    texts, _ = generate(model, tok, PROMPTS[:3], max_new_tokens=6)
    bench = from_items("t", [{"id": "right", "prompt": PROMPTS[0], "answer": texts[0]},
                             {"id": "wrong", "prompt": PROMPTS[1], "answer": texts[1] + "zz"},
                             {"id": "re", "prompt": PROMPTS[2], "answer": ".*", "match": "regex"}])
    r = evaluate(model, tok, bench, EvalSettings(max_new_tokens=6), device="cpu")
    assert list(r.correct) == [1, 0, 1]
    assert r.accuracy == pytest.approx(2 / 3)


def test_response_cache(model, tok, tmp_path):
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    bench = from_items("t", items())
    cache = tmp_path / "cache"
    settings = EvalSettings(max_new_tokens=6)
    first = evaluate_folder(folder, bench, settings, device="cpu", cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    assert first.outputs == evaluate(model, tok, bench, settings, device="cpu").outputs
    # Tamper with the cached file: a second call must return the cached (tampered) responses.
    tampered = Responses(first.item_ids, 1 - first.correct, first.output_tokens, first.outputs)
    tampered.save(files[0])
    assert np.array_equal(evaluate_folder(folder, bench, settings, device="cpu", cache_dir=cache).correct, 1 - first.correct)
    # Other settings or other items are another key.
    evaluate_folder(folder, bench, EvalSettings(max_new_tokens=5), device="cpu", cache_dir=cache)
    evaluate_folder(folder, bench.subset([0, 1, 7]), settings, device="cpu", cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 3
    m = response_matrix([first, tampered])
    assert m.shape == (2, len(bench)) and m.sum() == len(bench)
    files[0].write_bytes(b"not an npz")  # a damaged cache file is a miss, recomputed and rewritten
    again = evaluate_folder(folder, bench, settings, device="cpu", cache_dir=cache)
    assert np.array_equal(again.correct, first.correct) and Responses.load(files[0]).outputs == first.outputs
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        evaluate_folder(tmp_path / "nope", bench, settings, device="cpu", cache_dir=cache)


def test_adapter_cache_key_covers_its_base(tiny_zoo, tmp_path):
    """An adapter's answers depend on the base it is applied to: a changed base is a cache miss."""
    import shutil

    from data.benchmarks import load_benchmark

    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo / "models" / "base", root / "models" / "base")
    shutil.copytree(tiny_zoo / "adapters" / "cip-lora", root / "adapters" / "cip-lora")
    bench = load_benchmark(tiny_zoo / "benchmarks" / "cip.jsonl").subset(range(0, 400, 40))
    kw = dict(device="cpu", cache_dir=tmp_path / "cache")
    before = evaluate_folder(root / "adapters" / "cip-lora", bench, **kw)
    shutil.copy(tiny_zoo / "models" / "rev" / "model.safetensors", root / "models" / "base" / "model.safetensors")
    after = evaluate_folder(root / "adapters" / "cip-lora", bench, **kw)
    fresh = evaluate_folder(root / "adapters" / "cip-lora", bench, use_cache=False, **kw)
    assert np.array_equal(after.correct, fresh.correct) and after.outputs == fresh.outputs
    assert after.outputs != before.outputs


def test_bad_settings_and_batch_sizes_are_refused(model, tok):
    assert EvalSettings(stop="END").stop == ("END",)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        EvalSettings(max_new_tokens=2.5)
    bench = from_items("t", items())
    for size in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            evaluate(model, tok, bench, EvalSettings(max_new_tokens=4), batch_size=size, device="cpu")


def test_choice_scores_shared_prompt_varied_choices(model, tok):
    """Items with different numbers and lengths of choices, batches smaller than one item's choices:
    every score equals the unpadded prompt + choice oracle."""
    choices = [["a"], ["bc", "9", "dd1", "x", "yz", "12345"], ["q", "rs"], ["abcdefgh", "z"], ["7", "77", "777"], ["m"]]
    for batch_size in (1, 3, 64):
        scores, lengths = choice_scores(model, tok, PROMPTS, choices, batch_size=batch_size)
        for p, cs, s, n in zip(PROMPTS, choices, scores, lengths):
            assert list(n) == [len(tok(c, add_special_tokens=False)["input_ids"]) for c in cs]
            np.testing.assert_allclose(s, [logprob_oracle(model, tok, p, c) for c in cs], rtol=1e-4, atol=1e-4)


def test_choices_the_tokenizer_cannot_tell_apart_are_refused(model, tok):
    from data.benchmarks import Item

    ok = from_items("t", items())
    bad = Item("x", "rev:ab=", 1, ("\u0431\u0430", "\u0436\u0436"))  # Cyrillic: <unk> <unk> both
    assert tok(["\u0431\u0430", "\u0436\u0436"], add_special_tokens=False)["input_ids"][0] == \
        tok(["\u0436\u0436"], add_special_tokens=False)["input_ids"][0]
    with pytest.raises(ValueError, match="item x: choices 0 and 1 encode to the same tokens"):
        evaluate(model, tok, list(ok.items) + [bad], EvalSettings(max_new_tokens=4), device="cpu")
