"""Write SFT golden fixtures by running the published `finetune.py` `preprocess` (Qwen-VL repo).

The fixtures in tests/fixtures/finetune/ come from the reference code, never from qwenvl_jax (this
script does not import it). `finetune.py` imports deepspeed and peft at module level, which its
`preprocess` never uses, so the script reads `finetune.py`, takes the `preprocess` function's
source text as it is with `ast`, and executes it with the names it needs (torch, transformers,
`IGNORE_TOKEN_ID` = transformers' `LabelSmoother.ignore_index`). The tokenizer is the published one,
loaded as `finetune.py` loads it (`AutoTokenizer`, `use_fast=False`, right padding, pad = eod).

    /work/refenv/bin/python tools/make_finetune_fixtures.py \\
        --repo_dir /work/ref/qwen_vl_repo --reference_dir /work/ref/qwen_vl_chat \\
        --out tests/fixtures/finetune

The published tokenizer module downloads a font at import unless a file named SimSun.ttf is in the
working directory, so the script runs from a scratch directory holding an empty SimSun.ttf.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile

# Conversations in the official fine-tuning format. They cover: a single image, several images
# with "Picture k:" prefixes, multi-turn, grounding boxes in the answer, Chinese text, special-token
# text inside a value (finetune.py tokenizes values with allowed_special="all"), a first message
# from the assistant (dropped by preprocess), a URL image, and pure text.
CONVERSATIONS = [
    {
        "id": "identity_0",
        "conversations": [
            {"from": "user", "value": "你好"},
            {"from": "assistant", "value": "我是Qwen-VL,一个支持视觉输入的大模型。"},
        ],
    },
    {
        "id": "identity_1",
        "conversations": [
            {
                "from": "user",
                "value": "Picture 1: <img>https://qianwen-res.oss-cn-beijing.aliyuncs.com/"
                "Qwen-VL/assets/demo.jpeg</img>\n图中的狗是什么品种？",
            },
            {"from": "assistant", "value": "图中是一只拉布拉多犬。"},
            {"from": "user", "value": "框出图中的格子衬衫"},
            {
                "from": "assistant",
                "value": "<ref>格子衬衫</ref><box>(588,499),(725,789)</box>",
            },
        ],
    },
    {
        "id": "identity_2",
        "conversations": [
            {
                "from": "user",
                "value": "Picture 1: <img>assets/mm_tutorial/Chongqing.jpeg</img>\n"
                "Picture 2: <img>assets/mm_tutorial/Beijing.jpeg</img>\n图中都是哪",
            },
            {
                "from": "assistant",
                "value": "第一张图片是重庆的城市天际线，第二张图片是北京的天际线。",
            },
        ],
    },
    {
        "id": "grounding_en",
        "conversations": [
            {"from": "user", "value": "Picture 1: <img>imgs/dog.jpg</img>\nWhere is the dog?"},
            {
                "from": "assistant",
                "value": "<ref>The dog</ref><box>(12,34),(567,890)</box> sits on the left.",
            },
            {"from": "user", "value": "And the two cats?"},
            {
                "from": "assistant",
                "value": "<ref>two cats</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>",
            },
        ],
    },
    {
        "id": "assistant_first",
        "conversations": [
            {"from": "assistant", "value": "This greeting is dropped."},
            {"from": "user", "value": "What is 2+2?"},
            {"from": "assistant", "value": "2 + 2 = 4.\n\nIt's simple."},
        ],
    },
    {
        "id": "special_in_text",
        "conversations": [
            {"from": "user", "value": "Say <|endoftext|> please,  with   spaces\t\n"},
            {"from": "assistant", "value": "  OK:\n<quad>(1,2),(3,4),(5,6),(7,8)</quad>"},
        ],
    },
]

MAX_LEN = 1024


def load_preprocess(finetune_py: str, namespace: dict):
    """The `preprocess` function of finetune.py, executed from its own source text."""
    with open(finetune_py, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "preprocess"]
    if len(fns) != 1:
        raise SystemExit(f"{finetune_py}: expected one top-level def preprocess, found {len(fns)}")
    code = ast.get_source_segment(source, fns[0])
    exec(compile(code, finetune_py, "exec"), namespace)  # noqa: S102 - the published code
    return namespace["preprocess"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo_dir", required=True, help="QwenLM/Qwen-VL checkout (finetune.py)")
    ap.add_argument("--reference_dir", required=True, help="Qwen-VL-Chat remote-code directory")
    ap.add_argument("--out", required=True, help="output directory (tests/fixtures/finetune)")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    repo, ref = os.path.abspath(args.repo_dir), os.path.abspath(args.reference_dir)
    scratch = tempfile.mkdtemp(prefix="finetune_fixtures_")
    open(os.path.join(scratch, "SimSun.ttf"), "wb").close()
    os.chdir(scratch)
    sys.path.insert(0, ref)

    import torch
    import transformers
    from transformers.trainer_pt_utils import LabelSmoother

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        ref, model_max_length=MAX_LEN, padding_side="right", use_fast=False, trust_remote_code=True
    )
    tokenizer.pad_token_id = tokenizer.eod_id  # as finetune.py's train() does
    ns = {
        "torch": torch,
        "transformers": transformers,
        "Dict": dict,
        "IGNORE_TOKEN_ID": LabelSmoother.ignore_index,
    }
    preprocess = load_preprocess(os.path.join(repo, "finetune.py"), ns)
    os.makedirs(out, exist_ok=True)
    records = []
    for conv in CONVERSATIONS:
        d = preprocess([conv["conversations"]], tokenizer, MAX_LEN)
        ids = d["input_ids"][0].tolist()
        labels = d["labels"][0].tolist()
        # Real tokens end with the "\n" after the last <|im_end|>; the rest is eod padding (an
        # <|endoftext|> written inside a value is a real token, so attention_mask cannot tell).
        n = max(i for i, t in enumerate(ids) if t != tokenizer.eod_id) + 1
        assert ids[n - 2 : n] == [tokenizer.im_end_id, 198], conv["id"]
        records.append(
            {
                "id": conv["id"],
                "conversations": conv["conversations"],
                "input_ids": ids[:n],
                "labels": labels[:n],
                "max_len": MAX_LEN,
            }
        )
    path = os.path.join(out, "preprocess.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(
            {
                "source": "QwenLM/Qwen-VL finetune.py preprocess, published Qwen-VL-Chat tokenizer",
                "ignore_token_id": LabelSmoother.ignore_index,
                "records": records,
            },
            f,
            ensure_ascii=False,
            indent=1,
        )
        f.write("\n")
    print(f"wrote {len(records)} records to {path}")


if __name__ == "__main__":
    main()
