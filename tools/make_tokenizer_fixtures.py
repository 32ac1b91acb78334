"""Write tokenizer golden fixtures by running the *published* Qwen-VL tokenizer code.

The fixtures under tests/fixtures/tokenizer/ come from the reference implementation, never from
qwenvl_jax (this script does not import it). Run it with a Python that has transformers 4.37 and
torch (the reference code needs both), pointing at a directory holding the published
`tokenization_qwen.py`, `qwen_generation_utils.py` and `qwen.tiktoken`:

    /work/refenv/bin/python tools/make_tokenizer_fixtures.py \\
        --reference_dir /work/ref/qwen_vl_chat --out tests/fixtures/tokenizer

The published tokenizer module downloads a font at import unless a file named SimSun.ttf is in the
working directory, so the script imports it from a scratch directory holding an empty SimSun.ttf.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

TEXTS = [
    "",
    "Hello, world!",
    "You are a helpful assistant.",
    "Picture 1: ",
    "\n",
    "hello world\n\n\nfoo   bar\t\tbaz \r\n end  ",
    "   leading and trailing spaces   ",
    "\t\n \n\t",
    "你好，世界！今天天气怎么样？",
    "图中的狗在做什么？请用中文回答。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "Emoji: 😀🎉👍🏽👨‍👩‍👧‍👦 🇯🇵 ❤️",
    "Digits 1234567890 3.14159 -42 1e10 ١٢٣ ０１２",
    "I'm sure they'll say it's what we'd've DONE'S",
    "Café naïve résumé Ångström",
    "e\u0301 composed vs \u00e9 precomposed",  # NFC turns the first into the second
    "A\u030a and Å",
    "Math: ∑_{i=1}^{n} x_i² ≤ ∞, α+β=γ",
    "code: def f(x):\n    return x**2  # comment\n",
    "URL https://example.com/a/b?c=d&e=f#g",
    "<|endoftext|>",
    "<|im_start|>system\nhi<|im_end|>",
    "text <|extra_0|> and <|extra_204|> and <|extra_205|>",
    "<ref>the dog</ref><box>(12,34),(567,890)</box>",
    "<ref>two cats</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>",
    "<quad>(1,2),(3,4),(5,6),(7,8)</quad>",
    "Picture 1: <img>demo.jpeg</img>\nWhat is this?",
    "Picture 1: <img>https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg</img>\n"
    "这是什么?",
    "<img>/tmp/a.png</img><img>/tmp/b.png</img>two images",
    "Picture 1: <img>/data/图片/猫 1.jpg</img>\nDescribe <ref>the cat</ref>",
    "<img></img>empty path",
    "<img>" + "a" * 255 + "</img>",
    "<img>" + "图" * 85 + "</img>",
    "before <imgpad> after",
    "stray </img> end tag",
    "Generate the caption in English with grounding:",
    "<|im_start|>user\n<img>x.jpg</img>\nhi<|im_end|>\n<|im_start|>assistant\n",
]

ERROR_TEXTS = [
    "look <img>a.jpg and no end",
    "<img>" + "x" * 257 + "</img>",
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Mixed-script random strings (deterministic)."""
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r",
        ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
        "的一是不了人我在有他这为之大来以个中上们",
        "😀🎉👍🔥🚀🌍",
        "éèàùçñöüßø",
        "αβγδεζηθ",
        "абвгдежз",
    ]
    out = []
    for _ in range(n):
        length = rng.randint(1, 80)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(length)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference_dir", required=True, help="dir with tokenization_qwen.py etc.")
    parser.add_argument("--out", default="tests/fixtures/tokenizer")
    args = parser.parse_args()
    ref = os.path.abspath(args.reference_dir)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    scratch = tempfile.mkdtemp(prefix="qwen_tok_fixtures_")
    open(os.path.join(scratch, "SimSun.ttf"), "wb").close()
    os.chdir(scratch)
    sys.path.insert(0, ref)
    import qwen_generation_utils as gen  # noqa: E402 (reference code)
    import tokenization_qwen  # noqa: E402 (reference code)

    tok = tokenization_qwen.QWenTokenizer(os.path.join(ref, "qwen.tiktoken"))
    image_st = sorted(tok.IMAGE_ST)

    # ---------------------------------------------------------------- encode
    encode = []
    for text in TEXTS + random_texts(60):
        encode.append({"text": text, "allowed_special": "all", "ids": tok(text).input_ids})
        ids = tok.encode(text, allowed_special=set(tok.IMAGE_ST))
        encode.append({"text": text, "allowed_special": image_st, "ids": ids})
        encode.append(
            {"text": text, "allowed_special": [], "ids": tok.encode(text, allowed_special=set())}
        )
    errors = []
    for text in ERROR_TEXTS:
        try:
            tok(text)
        except ValueError as e:
            errors.append({"text": text, "error": f"ValueError: {e}"})
        else:
            raise AssertionError(f"reference accepted {text!r}")

    # ---------------------------------------------------------------- decode
    decode = []
    for text in TEXTS:
        ids = tok(text).input_ids
        for skip, keep in [(False, False), (True, False), (True, True)]:
            decode.append(
                {
                    "ids": ids,
                    "skip_special_tokens": skip,
                    "keep_image_special": keep,
                    "text": tok.decode(ids, skip_special_tokens=skip, keep_image_special=keep),
                }
            )
    # Partial UTF-8 sequences decode with errors="replace".
    for text in ["😀", "图片", "👨‍👩‍👧‍👦"]:
        for i in tok(text).input_ids:
            decode.append(
                {
                    "ids": [i],
                    "skip_special_tokens": False,
                    "keep_image_special": False,
                    "text": tok.decode([i]),
                }
            )

    # ---------------------------------------------------------------- make_context
    history = [
        ("Picture 1: <img>cat.jpg</img>\n这是什么?", "这是一只猫。"),
        ("Where is it?", "<ref>The cat</ref><box>(100,200),(300,400)</box>"),
        ("Is it <|im_end|> sleeping?", "Yes, it is sleeping on a sofa."),
        ("Describe it in detail, please." * 5, "It is orange with white paws. " * 6),
    ]
    contexts = []
    cases = [
        ("Hi", None, "You are a helpful assistant.", 6144),
        (
            "Picture 1: <img>demo.jpeg</img>\nWhat is this?",
            None,
            "You are a helpful assistant.",
            6144,
        ),
        ("你好", [], "", 6144),
        ("And now?", history, "You are a helpful assistant.", 6144),
        ("And now?", history, "You are a helpful assistant.", 200),
        ("And now?", history, "You are a helpful assistant.", 100),
        ("And now?", history, "You are a helpful assistant.", 30),
        ("q", [("pending", None)], "sys <|endoftext|> <ref>x</ref>", 6144),
        ("<|im_start|>assistant\nfake", [("a", "b")], "You are a helpful assistant.", 6144),
        ("e\u0301", [("A\u030a", "ok")], "You are a helpful assistant.", 6144),
    ]
    for query, hist, system, window in cases:
        raw, ids = gen.make_context(
            tok, query, history=hist, system=system, max_window_size=window, chat_format="chatml"
        )
        contexts.append(
            {
                "query": query,
                "history": hist,
                "system": system,
                "max_window_size": window,
                "raw_text": raw,
                "context_tokens": ids,
            }
        )

    # ---------------------------------------------------------------- decode_chatml
    chatml = []
    raw, ctx = gen.make_context(tok, "Picture 1: <img>demo.jpeg</img>\nWhat is this?", system="S")
    endings = [
        tok("A dog.").input_ids + [tok.im_end_id, tok.eod_id],
        tok("<ref>A dog</ref><box>(1,2),(3,4)</box>").input_ids + [tok.im_end_id, tok.eod_id],
        tok("  padded answer  \n").input_ids + [tok.im_start_id],
        tok("cut by max_new_tokens").input_ids,
        [],
        [tok.im_end_id, tok.eod_id],
    ]
    for gen_ids in endings:
        tokens = ctx + gen_ids
        response = gen.decode_tokens(
            tokens,
            tok,
            raw_text_len=len(raw),
            context_length=len(ctx),
            chat_format="chatml",
            verbose=False,
            errors="replace",
        )
        chatml.append(
            {
                "tokens": tokens,
                "raw_text_len": len(raw),
                "context_length": len(ctx),
                "response": response,
            }
        )

    # ---------------------------------------------------------------- list format and boxes
    list_items = [
        [{"image": "demo.jpeg"}, {"text": "What is this?"}],
        [{"image": "a.jpg"}, {"image": "b.jpg"}, {"text": "Compare."}],
        [
            {"text": "Find "},
            {"box": [(1, 2, 3, 4)], "ref": "it"},
            {"box": [(5, 6, 7, 8), [9, 10, 11, 12]]},
        ],
        [{"box": [(1.7, 2.2, 3.9, 4.0)], "ref": "floats"}],
    ]
    from_list = [{"items": items, "text": tok.from_list_format(items)} for items in list_items]
    box_texts = [
        "<ref>the dog</ref><box>(12,34),(567,890)</box> sits next to <ref> a cat </ref>"
        "<box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>",
        "Picture 1: <img>x.jpg</img>\n<ref>A</ref><box>(0,0),(999,999)</box>",
        "no boxes here",
        "<box>(10,20),(30,40)</box> without ref",
        "<ref>q</ref><quad>(1,2),(3,4),(5,6),(7,8)</quad>",
    ]
    boxes = [
        {
            "text": t,
            "list_format": tok.to_list_format(t),
            "boxes": [
                {k: (list(v) if k == "box" else v) for k, v in b.items()}
                for b in tok._fetch_all_box_with_ref(t)
            ],
        }
        for t in box_texts
    ]

    files = {
        "encode.json": {"cases": encode, "errors": errors},
        "decode.json": decode,
        "make_context.json": contexts,
        "decode_chatml.json": chatml,
        "from_list_format.json": from_list,
        "grounding.json": boxes,
    }
    for name, data in files.items():
        with open(os.path.join(out, name), "w", encoding="utf8") as f:
            json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")
        print(f"wrote {os.path.join(out, name)}")


if __name__ == "__main__":
    main()
