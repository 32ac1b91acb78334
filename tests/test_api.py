"""The inference API end to end on the tiny random model of the reference fixtures.

`tests/fixtures/reference/tiny.json` describes random weights for the `tiny` preset (regenerated
here from their seeds and written as an HF safetensors directory); the reference logits and greedy
generations next to it were computed by the published PyTorch code.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from reference_weights import REF

from qwenvl_jax import QwenVL, chat
from qwenvl_jax import tokenizer as tk
from qwenvl_jax.convert import checkpoint_kind
from qwenvl_jax.demo.vocab import train_sentencepiece


@pytest.fixture(scope="module")
def model(hf_dir):
    return QwenVL.from_pretrained(hf_dir, dtype="float32")


def _case(name):
    return np.load(os.path.join(REF, f"{name}.npz"))


# Relative error bound of the issue: max |ours - ref| <= 1e-4 * max |ref logit| (float32 both).
REL_TOL = 1e-4


@pytest.mark.parametrize(
    "case", ["tiny_text", "tiny_image2", pytest.param("tiny_long", marks=pytest.mark.slow)]
)
def test_logits_match_published(model, case, monkeypatch):
    # tiny_long has 2100 tokens: dynamic NTK (alpha 3) and logn scaling must be active.
    monkeypatch.chdir(REF)  # the prompts name img_a.png / img_b.jpg relative to this directory
    f = _case(case)
    n = int(f["lengths"][0])
    ids = f["input_ids"][0, :n]
    text = model.tokenizer.decode(ids)
    logits = model.logits(text)
    assert logits.shape == (n, model.config.vocab_size) and logits.dtype == np.float32
    err = np.abs(logits[:, f["sampled_columns"]] - f["logits_sampled"][0, :n]).max()
    assert err <= REL_TOL * f["max_abs_logit"], err
    np.testing.assert_array_equal(model.logits(ids), logits)  # ids and text agree


def test_logits_compile_once_per_length_bucket(model, hf_dir):
    from qwenvl_jax import api

    model.logits("Hello there")  # warm up this bucket
    size = api._forward._cache_size()
    a = model.logits("Hello there, a longer prompt of the same length bucket")
    assert a.shape[0] > len(model.tokenizer.encode("Hello there"))
    # A second instance with the same architecture (a reload) shares the compilation too.
    again = QwenVL.from_pretrained(hf_dir)
    np.testing.assert_array_equal(again.logits("Hello there"), model.logits("Hello there"))
    assert api._forward._cache_size() == size
    # Parameters changed in place are what the next call uses (as generate does).
    ln_f = model.model.transformer.ln_f.scale
    before = ln_f.get_value()
    try:
        ln_f.set_value(before * 2)
        assert not np.allclose(model.logits("Hello there"), again.logits("Hello there"))
    finally:
        ln_f.set_value(before)
    np.testing.assert_array_equal(model.logits("Hello there"), again.logits("Hello there"))


def test_bfloat16_runs_close_to_float32(model, hf_dir, monkeypatch):
    monkeypatch.chdir(REF)
    bf = QwenVL.from_pretrained(hf_dir, dtype="bfloat16")
    assert bf.model.lm_head.kernel.get_value().dtype == jnp.bfloat16
    text = "Picture 1: <img>img_a.png</img>\nWhat is in this picture?"
    ref = model.logits(text)
    got = bf.logits(text)
    assert got.dtype == np.float32 and got.shape == ref.shape
    # bf16 keeps 8 mantissa bits; through the tiny towers the logits drift by about 1% of range.
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 0.05, err
    # The cached bf16 decoder picks a token its own full forward ranks first; bf16 logits of this
    # size (~4) are spaced 1/32 apart and often tie, so "first" allows two such steps.
    new = bf.generate(text, max_new_tokens=2, do_sample=False)
    assert len(new) == 2 and got[-1][new[0]] >= got[-1].max() - 2 / 32


def test_bad_inputs_give_clear_errors(model, tmp_path):
    missing = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        model.logits(f"Picture 1: <img>{missing}</img>\nhi")
    with pytest.raises(ValueError, match="Unclosed image token"):
        model.logits("Picture 1: <img>a.png\nhi")
    long_path = "/x/" + "p" * 300 + ".png"
    with pytest.raises(ValueError, match=r"over 255|more than 255"):
        model.logits(f"<img>{long_path}</img>")
    with pytest.raises(ValueError, match="empty"):
        model.logits("")
    with pytest.raises(ValueError, match="allow_urls"):
        model.logits("<img>https://example.com/a.png</img>")


def test_save_pretrained_round_trip(model, tmp_path, monkeypatch):
    out = tmp_path / "export"
    model.save_pretrained(str(out))
    assert checkpoint_kind(str(out)) == "hf"
    assert (out / "qwen.tiktoken").exists() and (out / "tokenizer_config.json").exists()
    again = QwenVL.from_pretrained(str(out))
    assert isinstance(again.tokenizer, tk.QWenTokenizer)
    text = "你好, world 123"
    np.testing.assert_array_equal(again.logits(text), model.logits(text))
    ours = tmp_path / "ours"
    model.save(str(ours))
    assert checkpoint_kind(str(ours)) == "ours"
    np.testing.assert_array_equal(
        QwenVL.from_pretrained(str(ours)).logits(text), model.logits(text)
    )


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Qwen-VL checkpoint"):
        QwenVL.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothere"):
        QwenVL.from_pretrained(str(tmp_path / "nothere"))
    with pytest.raises(ValueError, match="unknown dtype; use one of"):
        QwenVL.from_pretrained(str(tmp_path), dtype="int8")


STOPS = [[151645], [151644]]


@pytest.mark.parametrize("case", ["tiny_gen_chat_text", "tiny_gen_chat_image"])
def test_greedy_generation_matches_published(model, case, monkeypatch):
    monkeypatch.chdir(REF)
    f = _case(case)
    prompt, want = f["prompt_ids"].tolist(), f["new_ids"].tolist()
    got = model.generate(prompt, max_new_tokens=len(want), do_sample=False, stop_words_ids=STOPS)
    assert got == want
    again = model.generate(prompt, max_new_tokens=len(want), do_sample=False, stop_words_ids=STOPS)
    assert again == got  # greedy is deterministic


def test_chat_reproduces_published_prompt_and_decoding(model, monkeypatch):
    monkeypatch.chdir(REF)
    f = _case("tiny_gen_chat_image")
    prompt, new = f["prompt_ids"].tolist(), f["new_ids"].tolist()
    text = model.tokenizer.decode(prompt)
    query = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    history = []
    response, out_history = model.chat(
        query, history=history, max_new_tokens=len(new), do_sample=False
    )
    raw_text, context = chat.make_context(model.tokenizer, query)
    assert context == prompt  # the published make_context gave the same prompt
    want = chat.decode_chatml(model.tokenizer, prompt + new, len(raw_text), len(context))
    assert isinstance(response, str) and response == want and response
    assert out_history is history and history == [(query, response)]
    # A second turn carries the first in its prompt (make_context is checked against the
    # published prompts in test_chat): its response is the one generated from that prompt.
    first_turn = list(history)
    response2, history = model.chat("And now?", history=history, max_new_tokens=3)
    assert len(history) == 2 and history[1] == ("And now?", response2)
    raw2, context2 = chat.make_context(model.tokenizer, "And now?", history=first_turn)
    assert context2[: len(prompt)] == prompt and len(context2) > len(prompt) + 10
    new2 = model.generate(context2, max_new_tokens=3, stop_words_ids=STOPS)
    want2 = chat.decode_chatml(model.tokenizer, context2 + new2, len(raw2), len(context2))
    assert response2 == want2


def test_max_window_size_from_generation_config_truncates_history(hf_dir, tmp_path, monkeypatch):
    d = tmp_path / "small_window"
    d.mkdir()
    for name in os.listdir(hf_dir):
        os.symlink(os.path.join(hf_dir, name), d / name)
    (d / "generation_config.json").write_text(
        json.dumps({"max_window_size": 40, "do_sample": False, "max_new_tokens": 3})
    )
    vl = QwenVL.from_pretrained(str(d))
    assert vl.generation_config["max_window_size"] == 40
    history = [("An earlier question about something long enough " * 5, "An answer.")]
    raw_fresh, fresh = chat.make_context(vl.tokenizer, "What now?")
    raw_kept, kept = chat.make_context(vl.tokenizer, "What now?", history=history)
    assert len(kept) > len(fresh)  # the default window keeps the earlier turn

    def respond(raw, context):
        new = vl.generate(context, max_new_tokens=3, stop_words_ids=STOPS)
        return chat.decode_chatml(vl.tokenizer, context + new, len(raw), len(context))

    # The two prompts give different answers, so the check below tells them apart.
    assert respond(raw_kept, kept) != respond(raw_fresh, fresh)
    # The 40-token window leaves no room for the earlier turn: chat answers the fresh prompt.
    response, _ = vl.chat("What now?", history=list(history))
    assert response == respond(raw_fresh, fresh)


def test_sampling_is_seeded(model):
    kw = dict(max_new_tokens=5, do_sample=True, top_p=0.9, top_k=50, temperature=1.5)
    a = model.generate("Tell me a story.", seed=1, **kw)
    assert a == model.generate("Tell me a story.", seed=1, **kw)
    assert len(a) == 5 or a[-1] == model.tokenizer.eod_id
    # The seed matters and the draws are not the greedy path (fixed seeds: deterministic).
    greedy = model.generate("Tell me a story.", max_new_tokens=5, do_sample=False)
    draws = {tuple(model.generate("Tell me a story.", seed=s, **kw)) for s in range(1, 5)}
    assert len(draws) > 1 and any(d != tuple(greedy) for d in draws)
    # top_k=1 keeps only the argmax: sampling then follows the greedy path.
    one = dict(kw, top_k=1)
    assert model.generate("Tell me a story.", seed=2, **one) == greedy
    with pytest.raises(TypeError, match="unknown generation arguments"):
        model.generate("x", num_beams=2)


def test_sentencepiece_tokenizer_with_a_random_tiny_model(tmp_path, monkeypatch):
    from qwenvl_jax.config import get_preset

    texts = ["What is in the picture? A red square.", "Describe the image.", "图片里有什么?"] * 5
    sp = train_sentencepiece(texts, str(tmp_path / "sp"), vocab_size=300)
    padded = tk.config_overrides(sp)["vocab_size"]
    assert padded % 128 == 0 and 0 <= padded - sp.n_vocab < 128
    # No padding rows: an untrained model could otherwise emit ids that no token decodes to.
    cfg = get_preset("tiny", **tk.config_overrides(sp, multiple_of=1))
    assert cfg.vocab_size == sp.n_vocab
    vl = QwenVL.random(cfg, tokenizer=sp, seed=3)
    monkeypatch.chdir(REF)
    query = chat.from_list_format([{"image": "img_a.png"}, {"text": "What is this?"}])
    assert vl.logits(query).shape == (len(sp.encode(query)), cfg.vocab_size)
    response, history = vl.chat(query, max_new_tokens=4, do_sample=False)
    assert isinstance(response, str) and history == [(query, response)]
    with pytest.raises(ValueError, match=f"vocab_size is {sp.n_vocab}"):
        QwenVL(vl.model, tk.QWenTokenizer())

    # A model with 16 adapter queries needs a tokenizer whose <img> spans hold 16 positions.
    over = tk.config_overrides(sp, multiple_of=1)
    over["visual"]["n_queries"] = 16
    cfg16 = get_preset("tiny", **over)
    with pytest.raises(ValueError, match="load the tokenizer with image_span=16"):
        QwenVL.random(cfg16, tokenizer=sp)
    sp16 = tk.SentencePieceQWenTokenizer(sp.model_file, image_span=16)
    vl16 = QwenVL.random(cfg16, tokenizer=sp16, seed=3)
    # image_root: a relative path (short enough for a 16-position span) is read from there.
    query = chat.from_list_format([{"image": "img_a.png"}, {"text": "What is this?"}])
    rooted = QwenVL(vl16.model, sp16, image_root=str(REF))
    monkeypatch.chdir(tmp_path)
    got = rooted.logits(query)
    with pytest.raises(FileNotFoundError):
        vl16.logits(query)  # no img_a.png in the current directory
    monkeypatch.chdir(REF)
    np.testing.assert_array_equal(got, vl16.logits(query))
    assert len(sp16.encode(query)) == len(sp.encode(query)) - 240


def test_from_training_workdir(model, tmp_path, monkeypatch):
    from flax import nnx

    from qwenvl_jax import checkpoint

    # Relative paths, as a user types them: Orbax itself only accepts absolute ones.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    model.config.save_hf_json("run")
    params = nnx.to_pure_dict(nnx.state(model.model, nnx.Param))
    ckpt = checkpoint.Checkpointer("run", async_save=False)
    ckpt.save(7, params, {"count": np.zeros((), np.int32)}, {"scan_layers": False}, wait=True)
    ckpt.close()
    assert checkpoint_kind("run") == "workdir"
    loaded = QwenVL.from_pretrained("run")
    text = "Hello"
    np.testing.assert_array_equal(loaded.logits(text), model.logits(text))
