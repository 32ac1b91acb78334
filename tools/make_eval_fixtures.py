r"""Write tests/fixtures/eval/goldens.json by running the published eval_mm code on our fixtures.

The published scripts (Qwen-VL's eval_mm/: evaluate_vqa.py, vqa.py, vqa_eval.py,
infographicsvqa_eval.py, evaluate_grounding.py, evaluate_caption.py, evaluate_multiple_choice.py)
are NOT part of this repository: the one argument names a directory holding them. They are
imported from there and their own code computes every golden value:

- prompts: each script's `prompt` string (read from its `__main__` block) fed to its Dataset
  class over the fixture files, so the golden prompt is what the script would tokenize;
- generation lengths: the script's `ds_collections` and the keywords of its `model.generate` call;
- scores: VQAEval (VQA score), infographicsvqa_eval.evaluate_method (ANLS), the relaxed and exact
  accuracy functions (with the GQA clean-up block of `__main__` executed as written), the
  grounding loop of `__main__` (executed as written, with torch / torchvision, instrumented to
  record each IoU), the multiple-choice loss loop, and COCOEvalCap for CIDEr.

The fixture inputs are tests/fixtures/eval/data/ (the official file layout, hand-written) and
tests/fixtures/eval/predictions.json (hand-written model outputs, as decoded, per benchmark).

Needs torch, torchvision, numpy, pycocoevalcap and Java (for the PTB tokenizer) in a separate
environment (torch is not a dependency of qwenvl_jax). Runtime shims, here only: `transformers`
(and `tqdm` when absent) are stubbed, since the scripts import them at module level but no model
runs; COCOEvalCap's METEOR and SPICE scorers are stubbed (SPICE downloads Stanford models; only
CIDEr is a golden). Example::

  git --git-dir=/path/to/Qwen-VL/.git archive HEAD eval_mm | tar -x -C /tmp/qwen_eval
  /path/to/torch-venv/bin/python tools/make_eval_fixtures.py /tmp/qwen_eval/eval_mm
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.machinery
import json
import os
import random
import sys
import tempfile
import types

FIXTURES = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "eval"
)


def _install_shims() -> None:
    # torch._dynamo (imported by torchvision) looks up module specs, so the stubs carry one.
    stub = types.ModuleType("transformers")
    stub.__spec__ = importlib.machinery.ModuleSpec("transformers", None)
    stub.AutoModelForCausalLM = stub.AutoTokenizer = object
    sys.modules["transformers"] = stub
    try:
        import tqdm  # noqa: F401
    except ImportError:
        tq = types.ModuleType("tqdm")
        tq.__spec__ = importlib.machinery.ModuleSpec("tqdm", None)
        tq.tqdm = lambda it=None, *a, **k: it
        sys.modules["tqdm"] = tq


def _main_block(path: str) -> list[ast.stmt]:
    """The statements of the script's `if __name__ == '__main__':` block."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return node.body
    raise ValueError(f"{path}: no __main__ block")


def _find(nodes, kind, pred):
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, kind) and pred(sub):
                return sub
    raise ValueError(f"no {kind.__name__} matching {pred}")


def _assigned(nodes, name: str):
    """The literal value assigned to `name` in the block."""
    node = _find(nodes, ast.Assign, lambda n: ast.unparse(n.targets[0]) == name)
    return node


def _generate_kwargs(nodes) -> dict:
    call = _find(nodes, ast.Call, lambda n: ast.unparse(n.func) == "model.generate")
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            out[kw.arg] = ast.unparse(kw.value)
    return out


def _run(nodes: list[ast.stmt], namespace: dict, path: str) -> dict:
    module = ast.Module(body=nodes, type_ignores=[])
    exec(compile(ast.fix_missing_locations(module), path, "exec"), namespace)
    return namespace


def vqa_goldens(src: str, preds: dict, tmp: str) -> dict:
    import evaluate_vqa as ev
    import infographicsvqa_eval as anls
    from vqa import VQA
    from vqa_eval import VQAEval

    path = os.path.join(src, "evaluate_vqa.py")
    main = _main_block(path)
    prompt = ast.literal_eval(_assigned(main, "prompt").value)
    gqa_block = _find(main, ast.If, lambda n: ast.unparse(n.test) == "'gqa' in args.dataset")
    out = {"generate": _generate_kwargs(main), "datasets": {}}
    for name, cfg in ev.ds_collections.items():
        g = {"ds_collection": cfg}
        ds = ev.VQADataset(cfg["train"], cfg["test"], prompt, few_shot=0)
        items = [ds[i] for i in range(len(ds))]
        g["prompts"] = [it["question"] for it in items]
        if name == "vqav2_val":  # one few-shot prompt (the train fixture has a single line)
            random.seed(0)
            g["few_shot_prompt"] = ev.VQADataset(cfg["train"], cfg["test"], prompt, 1)[0][
                "question"
            ]
        out["datasets"][name] = g
        if name not in preds:
            continue
        answers = [p.strip() for p in preds[name]]  # the script strips the decoded text
        metric = cfg["metric"]
        if metric == "vqa_score":
            res_file = os.path.join(tmp, f"{name}.json")
            with open(res_file, "w") as f:
                json.dump(
                    [
                        {"question_id": it["question_id"], "answer": a}
                        for it, a in zip(items, answers, strict=True)
                    ],
                    f,
                )
            vqa = VQA(cfg["annotation"], cfg["question"])
            scorer = VQAEval(vqa, vqa.loadRes(resFile=res_file, quesFile=cfg["question"]), n=2)
            scorer.evaluate()
            g["overall"] = scorer.accuracy["overall"]
            g["per_question"] = [[q, v] for q, v in scorer.evalQA.items()]
        elif metric == "anls":
            subm = os.path.join(tmp, f"{name}.json")
            with open(subm, "w") as f:
                json.dump(
                    [
                        {
                            "questionId": it["question_id"],
                            "answer": a,
                            "annotation": it["annotation"],
                        }
                        for it, a in zip(items, answers, strict=True)
                    ],
                    f,
                )
            anls.validate_data(cfg["annotation"], subm)
            args = argparse.Namespace(answer_types=False, anls_threshold=0.5)
            r = anls.evaluate_method(cfg["annotation"], subm, args)
            g["overall"] = r["result"]["score"]
            g["per_question"] = [[int(q), v["score"]] for q, v in r["per_sample_result"].items()]
        else:
            pairs = zip(items, answers, strict=True)
            entries = [{"answer": a, "annotation": it["annotation"]} for it, a in pairs]
            if "gqa" in name:
                ns = {"args": argparse.Namespace(dataset=name), "merged_outputs": entries}
                _run([gqa_block], ns, path)
                g["postprocessed"] = [e["answer"] for e in entries]
            fn = (
                ev.evaluate_relaxed_accuracy
                if metric == "relaxed_accuracy"
                else (ev.evaluate_exact_match_accuracy)
            )
            g["overall"] = fn(copy.deepcopy(entries))
            g["per_question"] = [fn([copy.deepcopy(e)]) for e in entries]
    return out


def grounding_goldens(src: str, preds: dict) -> dict:
    import evaluate_grounding as eg
    import torch

    path = os.path.join(src, "evaluate_grounding.py")
    main = _main_block(path)
    prompt = ast.literal_eval(_assigned(main, "prompt").value)
    pattern = _assigned(main, "PATTERN")
    loop = _find(main, ast.For, lambda n: ast.unparse(n.iter) == "enumerate(merged_outputs)")
    loop = copy.deepcopy(loop)
    loop.body.append(ast.parse("_ious.append(iou)").body[0])  # record each sample's IoU
    out = {"generate": _generate_kwargs(main), "datasets": {}}
    for name, test in eg.ds_collections.items():
        ds = eg.RefCOCODataset(test=test, tokenizer=None, prompt=prompt)
        items = [ds[i] for i in range(len(ds))]
        g = {"test": test, "prompts": [it["text"] for it in items]}
        outputs = [
            {"answer": a, "gt_bbox": it["bbox"], "hw": it["hw"]}
            for it, a in zip(items, preds[name], strict=True)
        ]
        ns = {
            "torch": torch,
            "re": eg.re,
            "box_iou": eg.box_iou,
            "merged_outputs": outputs,
            "correct": 0,
            "total_cnt": 0,
            "_ious": [],
        }
        _run([pattern, loop], ns, path)
        g["overall"] = ns["correct"] / ns["total_cnt"]
        g["ious"] = ns["_ious"]
        out["datasets"][name] = g
    return out


def caption_goldens(src: str, preds: dict, tmp: str) -> dict:
    import evaluate_caption as ec
    import pycocoevalcap.eval as cap_eval
    from pycocotools.coco import COCO

    class _Skipped:  # METEOR / SPICE stand-in: only CIDEr is a golden
        def __init__(self, *a, **k):
            pass

        def method(self):
            return "skipped"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    cap_eval.Meteor = cap_eval.Spice = _Skipped
    path = os.path.join(src, "evaluate_caption.py")
    main = _main_block(path)
    prompt = ast.literal_eval(_assigned(main, "prompt").value)
    out = {"generate": _generate_kwargs(main), "datasets": {}}
    for name, cfg in ec.ds_collections.items():
        ds = ec.CaptionDataset(cfg["train"], cfg["test"], prompt)
        items = [ds[i] for i in range(len(ds))]
        g = {"ds_collection": cfg, "prompts": [it["input_text"] for it in items]}
        res_file = os.path.join(tmp, f"{name}.json")
        with open(res_file, "w") as f:
            json.dump(
                [
                    {"image_id": int(it["image_id"]), "caption": c.strip()}
                    for it, c in zip(items, preds[name], strict=True)
                ],
                f,
            )
        coco = COCO(cfg["test"])
        coco_eval = cap_eval.COCOEvalCap(coco, coco.loadRes(res_file))
        coco_eval.evaluate()
        g["CIDEr"] = coco_eval.eval["CIDEr"]
        g["per_image"] = [[i, e["CIDEr"]] for i, e in coco_eval.imgToEval.items()]
        out["datasets"][name] = g
    return out


def multiple_choice_goldens(src: str, preds: dict) -> dict:
    import evaluate_multiple_choice as em
    import torch

    class _Recorder:  # the Dataset tokenizes the prompt and each target: record the texts
        def __init__(self):
            self.texts = []

        def __call__(self, text):
            self.texts.append(text)
            return types.SimpleNamespace(input_ids=[0] * len(text))

    path = os.path.join(src, "evaluate_multiple_choice.py")
    main = _main_block(path)
    prompt = ast.literal_eval(_assigned(main, "prompt").value)
    loop = _find(main, ast.For, lambda n: ast.unparse(n.target) == "(loss, target_length, answer)")
    out = {"datasets": {}}
    for name, cfg in em.ds_collections.items():
        tok = _Recorder()
        ds = em.MultipleChoiceDataste(test=cfg["test"], prompt=prompt, tokenizer=tok)
        items = [ds[i] for i in range(len(ds))]
        g = {"ds_collection": cfg, "tokenized_texts": tok.texts}
        p = preds[name]
        ns = {
            "losses": [torch.tensor(x["token_losses"], dtype=torch.float32) for x in p],
            "target_lengths": [x["target_lengths"] for x in p],
            "answer": [it["answer"] for it in items],
            "results": [],
        }
        _run([loop], ns, path)
        g["results"] = ns["results"]
        g["overall"] = sum(ns["results"]) / len(ns["results"])
        out["datasets"][name] = g
    return out


def vqa_tables() -> dict:
    from vqa_eval import VQAEval

    e = VQAEval()
    return {
        "contractions": e.contractions,
        "number_words": e.manualMap,
        "articles": e.articles,
        "punctuation": e.punct,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("eval_mm_dir", help="directory holding the published eval_mm/ scripts")
    parser.add_argument("--fixtures", default=FIXTURES, help="tests/fixtures/eval")
    args = parser.parse_args(argv)
    src, fixtures = os.path.abspath(args.eval_mm_dir), os.path.abspath(args.fixtures)
    _install_shims()
    sys.path.insert(0, src)
    with open(os.path.join(fixtures, "predictions.json"), encoding="utf-8") as f:
        preds = json.load(f)
    os.chdir(fixtures)  # the scripts open data/<dataset>/... relative to the working directory
    with tempfile.TemporaryDirectory() as tmp:
        goldens = {
            "vqa": vqa_goldens(src, preds, tmp),
            "grounding": grounding_goldens(src, preds),
            "caption": caption_goldens(src, preds, tmp),
            "multiple_choice": multiple_choice_goldens(src, preds),
            "vqa_tables": vqa_tables(),
        }
    with open(os.path.join(fixtures, "goldens.json"), "w", encoding="utf-8") as f:
        json.dump(goldens, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {os.path.join(fixtures, 'goldens.json')}")


if __name__ == "__main__":
    main()
