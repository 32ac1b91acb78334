"""The device suite: every benchmark a lent accelerator should run, in one call.

  python -m qwenvl_jax.bench --suite=device --suite_out=DIR     # one H100/H200, about 9 minutes
  python -m qwenvl_jax.bench --suite=device --tiny              # the same items at CPU sizes

Items, most important first (a later one is skipped, with its reason in the table, when the time
budget `--suite_budget_s` runs out):

1. `ref8` forward + backward (the published PyTorch step's shape), beside that step when
   `--reference_dir` holds the published code and `--reference_python` has torch.
2. `decode` of the whole 7B in bf16 with random weights at batch 1 and 32.
3. `full`, the whole Qwen-VL at batch 2 x 2048 (beside the published step likewise).
4. `--attn_impl` A/B on ref8: each other kernel against item 1's row (auto, no remat).
5. `--remat` A/B on ref8: each other policy against item 1's row.
6. the serving benchmark (`bench --mode=serve`, qwenvl_jax/serve/bench.py, when it exists): the
   server on a random-weights checkpoint of the decode model (bf16 on an accelerator), written to
   a temporary folder first, with 32 concurrent clients against one at a time.

Each item is one `python -m qwenvl_jax.bench` subprocess: an out-of-memory or a crash costs that
item only, each gets the device's memory afresh, and a hung compile is stopped at the item's
deadline. They share a persistent compilation cache (a temporary folder), so a program one item
compiled is loaded by the next. The results go to DIR/device_suite.json (every item's command, exit
status, seconds and the bench's JSON) and DIR/device_suite.md (one table; docs/performance.md says
where it goes); nothing else is written to DIR.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

# Shapes of each item at device size and at --tiny (CPU) size.
DEVICE = dict(
    train="ref8",
    full="full",
    decode="full",
    steps=5,
    warmup=1,
    batches="1,32",
    prompt=256,
    new=128,
    attn=("auto", "cudnn", "tokamax"),
    remat=("none", "dots", "full"),
)
# The tiny training items run at batch 2, the full item's, so they compile one program (on a
# CPU `auto` attention is XLA's too).
TINY = dict(
    train="tiny",
    full="tiny",
    decode="tiny",
    steps=1,
    warmup=0,
    batches="1,4",
    prompt=16,
    new=8,
    attn=("auto", "tokamax"),
    remat=("none", "full"),
    batch=2,
)
# Seconds an item may take at most at device size (compile included); --tiny has no cap but the
# suite's budget.
CAPS = dict(ref8=180, decode=150, full=210, attn=200, remat=150, serve=240)
# The model each decode shape serves (bench.SHAPES' model) and the serve load at each size.
SERVE = dict(
    device=dict(
        preset="qwen-vl-7b", flags=["--concurrency=32", "--num_requests=64", "--max_tokens=64"]
    ),
    tiny=dict(
        preset="tiny",
        flags=[
            "--concurrency=4",
            "--num_requests=8",
            "--max_tokens=4",
            "--server_flags=--max_seq_len=512",
        ],
    ),
)
# Writes a random-weights checkpoint (qwenvl_jax's own format, with the published vocabulary) for
# the serve item: argv = preset, folder. A subprocess, so this process never takes the GPU.
_WRITE_CHECKPOINT = (
    "import sys; from qwenvl_jax import api, config, tokenizer;"
    " cfg = config.get_preset(sys.argv[1]);"
    " m = api.QwenVL.random(cfg, dtype=api.default_dtype(),"
    " tokenizer=tokenizer.load_tokenizer(image_span=cfg.visual.n_queries));"
    " m.save(sys.argv[2])"
)


@dataclasses.dataclass
class Item:
    """One bench subprocess: its name, its flags, the seconds it may take."""

    name: str
    flags: list[str]
    cap_s: float
    skip: str = ""  # why it does not run (set before it would)
    checkpoint_preset: str = (
        ""  # a random checkpoint of this preset is written first (--checkpoint)
    )


def serve_bench_present() -> bool:
    """Whether the serving benchmark (qwenvl_jax/serve/bench.py) is in this checkout."""
    try:
        return importlib.util.find_spec("qwenvl_jax.serve.bench") is not None
    except ModuleNotFoundError:
        return False


def plan(tiny: bool, reference_dir: str = "", reference_python: str = "") -> list[Item]:
    """The suite's items in the order they run."""
    s = TINY if tiny else DEVICE
    timing = [f"--steps={s['steps']}", f"--warmup={s['warmup']}"]
    if "batch" in s:
        timing.append(f"--batch={s['batch']}")
    ref = [f"--reference_dir={reference_dir}"] if reference_dir else []
    if ref and reference_python:
        ref.append(f"--reference_python={reference_python}")
    # The published code cannot build the tiny model (16 adapter queries): tiny_ref is its size.
    ref_shape = "tiny_ref" if tiny else s["train"]
    cap = (lambda k: 1e9) if tiny else CAPS.get
    items = [
        Item("ref8", [f"--shape={ref_shape if ref else s['train']}", *timing, *ref], cap("ref8")),
        Item(
            "decode",
            [
                "--mode=decode",
                f"--shape={s['decode']}",
                f"--decode_batches={s['batches']}",
                f"--prompt_len={s['prompt']}",
                f"--new_tokens={s['new']}",
            ],
            cap("decode"),
        ),
        Item(
            "full",
            [
                f"--shape={s['full']}",
                *timing,
                *([] if "batch" in s else ["--batch=2"]),
                *(ref if not tiny else []),
            ],
            cap("full"),
        ),
        # Item 1 ran the first kernel and policy: these run the others.
        Item(
            "attn",
            [
                f"--shape={s['train']}",
                f"--attn_impl={','.join(s['attn'][1:])}",
                f"--remat={s['remat'][0]}",
                *timing,
            ],
            cap("attn"),
        ),
        Item(
            "remat",
            [
                f"--shape={s['train']}",
                f"--remat={','.join(s['remat'][1:])}",
                f"--attn_impl={s['attn'][0]}",
                *timing,
            ],
            cap("remat"),
        ),
    ]
    sv = SERVE["tiny" if tiny else "device"]
    serve = Item("serve", ["--mode=serve", *sv["flags"]], cap("serve"))
    serve.checkpoint_preset = sv["preset"]
    if not serve_bench_present():
        serve.skip = "no serving benchmark in this checkout (qwenvl_jax/serve/bench.py)"
    items.append(serve)
    items[0].flags += [f"--attn_impl={s['attn'][0]}", f"--remat={s['remat'][0]}"]
    return items


def run_item(item: Item, work_dir: str, seconds_left: float, env: dict) -> dict:
    """Runs one item as a subprocess; returns its record (the bench's JSON under "result")."""
    rec = dict(name=item.name, command=None, rc=None, seconds=0.0, result=None, error=item.skip)
    if item.skip:
        return rec
    timeout = min(item.cap_s, seconds_left)
    if timeout < 20:
        rec["error"] = f"skipped: {seconds_left:.0f} s of the suite's budget left"
        return rec
    path = os.path.join(work_dir, f"{item.name}.json")
    t0 = time.time()
    flags = list(item.flags)
    if item.checkpoint_preset:
        ckpt = os.path.join(work_dir, f"{item.name}_checkpoint")
        print(f"== {item.name}: writing a random {item.checkpoint_preset} checkpoint", flush=True)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _WRITE_CHECKPOINT, item.checkpoint_preset, ckpt],
                env=env,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            proc = None
        if proc is None or proc.returncode:
            rec["error"] = "writing its random checkpoint failed (output above)"
            return rec
        flags.append(f"--checkpoint={ckpt}")
        timeout -= time.time() - t0
    cmd = [sys.executable, "-m", "qwenvl_jax.bench", *flags, f"--json_out={path}"]
    rec["command"] = " ".join(["python", *cmd[1:]])
    print(f"== {item.name}: {rec['command']} (at most {timeout:.0f} s)", flush=True)
    try:
        # Output streams to the caller's terminal/log as it comes; the result is the JSON file.
        proc = subprocess.run(cmd, env=env, timeout=timeout)
        rec["rc"] = proc.returncode
    except subprocess.TimeoutExpired:
        rec["rc"], rec["error"] = 124, f"stopped after {timeout:.0f} s"
    rec["seconds"] = round(time.time() - t0, 1)
    if rec["rc"] == 0 and os.path.isfile(path):
        with open(path) as f:
            rec["result"] = json.load(f)
    elif not rec["error"]:
        rec["error"] = f"exit {rec['rc']} (its output is above in the log)"
    return rec


def run_suite(
    out_dir: str,
    tiny: bool = False,
    budget_s: float = 540.0,
    reference_dir: str = "",
    reference_python: str = "",
    only: tuple[str, ...] = (),
) -> dict:
    """Runs the planned items (`only` names a subset) within `budget_s` seconds; writes
    out_dir/device_suite.json and device_suite.md and returns the JSON's dict."""
    os.makedirs(out_dir, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix="qwenvl_suite_")
    env = dict(os.environ)
    if tiny:
        env.setdefault("JAX_PLATFORMS", "cpu")
    # One compilation cache for all items (jax reads these variables at start-up).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(work_dir, "cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    items = [i for i in plan(tiny, reference_dir, reference_python) if not only or i.name in only]
    if reference_dir == "":
        print("published PyTorch step: skipped (no --reference_dir with the published code)")
    t_end = time.time() + budget_s
    records = []
    try:
        for item in items:
            rec = run_item(item, work_dir, t_end - time.time(), env)
            if rec["error"]:
                print(f"== {item.name}: {rec['error']}", flush=True)
            records.append(rec)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    flags = {
        k: os.environ[k]
        for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "QWENVL_NO_COMPILER_FLAGS")
        if k in os.environ
    }
    summary = dict(tiny=tiny, budget_s=budget_s, versions=_versions(), env=flags, items=records)
    with open(os.path.join(out_dir, "device_suite.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = markdown(summary)
    with open(os.path.join(out_dir, "device_suite.md"), "w") as f:
        f.write(table)
    print(table, flush=True)
    return summary


def _versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "flax", "optax", "grain", "torch", "transformers", "tokamax"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _label(r: dict) -> str:
    return f"attn {r['attn_impl']}, remat {r['remat']}"


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def rows(summary: dict) -> list[list[str]]:
    """The table's rows: one per training result, decode batch and serve result; one per item
    that gave none (with its reason)."""
    out = []
    first = summary["items"][0]["result"] if summary["items"] else None
    baseline = None  # item 1's row: the A/B items' reference
    if first and "tokens_per_s" in first.get("ours", first):
        baseline = first.get("ours", first)
    for rec in summary["items"]:
        try:
            out.extend(_item_rows(rec, baseline))
        except (KeyError, TypeError) as e:  # a bench whose JSON changed: the JSON still has it
            out.append(
                [
                    rec["name"],
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"see device_suite.json (no table row: {type(e).__name__} {e})",
                ]
            )
    return out


def _item_rows(rec: dict, baseline: dict | None) -> list[list[str]]:
    r = rec["result"]
    if r is None:
        return [[rec["name"], "-", "-", "-", "-", "-", "-", "-", rec["error"] or "-"]]
    if rec["name"] == "decode":
        return _decode_rows(r)
    if rec["name"] == "serve":
        return _serve_rows(r)
    out = []
    ours, ref = (r["ours"], r["reference"]) if "ours" in r else (r, None)
    results = ours if isinstance(ours, list) else [ours]
    base = results[0]
    if rec["name"] in ("attn", "remat") and baseline:
        same = all(baseline[k] == base[k] for k in ("shape", "batch", "mode"))
        base = baseline if same else base
    if ref is not None:
        out.append(
            [
                rec["name"],
                f"{ref['shape']} B={ref['batch']}",
                "published PyTorch",
                "-",
                f"{ref['step_s']:.3f}",
                f"{ref['tokens_per_s']:,.0f}",
                _fmt(ref["mfu"], ".1%"),
                _fmt(ref["peak_memory_gb"], ".1f"),
                f"torch {ref['torch']}, {ref['dtype']}",
            ]
        )
    for x in results:
        notes = []
        if x is not base:
            notes.append(f"{x['tokens_per_s'] / base['tokens_per_s']:.2f}x {_label(base)}")
        if ref is not None:
            notes.append(f"{x['tokens_per_s'] / ref['tokens_per_s']:.2f}x published")
        if "real_tokens_per_s" in x:
            notes.append(f"real tokens/s {x['real_tokens_per_s']:,.0f}")
        if x.get("mfu_real") is not None:
            notes.append(f"MFU over real work {x['mfu_real']:.1%}")
        out.append(
            [
                rec["name"],
                f"{x['shape']} B={x['batch']}",
                x["attn_impl"],
                x["remat"],
                f"{x['step_s']:.3f}",
                f"{x['tokens_per_s']:,.0f}",
                _fmt(x["mfu"], ".1%"),
                _fmt(x["peak_memory_gb"], ".1f"),
                "; ".join(notes) or "-",
            ]
        )
    return out


def _decode_rows(r: dict) -> list[list[str]]:
    out = []
    for b, tps in r["tokens_per_s"].items():
        note = f"{r['prompt_len']}-token prompts, {r['new_tokens']} new, prefill included"
        if str(b) == "1":
            note += f"; {r['speedup_vs_stepwise']:.2f}x the per-token Python loop"
        out.append(["decode", f"{r['shape']} B={b}", "-", "-", "-", f"{tps:,.1f}", "-", "-", note])
    return out


def _serve_rows(r: dict) -> list[list[str]]:
    out = []
    for run in ("concurrent", "sequential"):
        x = r[run]
        note = (
            f"{x['requests']} requests, {x['requests_per_s']:.2f} requests/s, TTFT p50"
            f" {x['ttft_ms_p50']:.0f} ms, TPOT p50 {x['tpot_ms_p50']:.1f} ms"
            + (f", {len(x['errors'])} errors" if x["errors"] else "")
            + (f"; {r['ratio']:.2f}x one at a time" if run == "concurrent" else "")
        )
        out.append(
            [
                "serve",
                f"{x['concurrency']} clients",
                "-",
                "-",
                "-",
                f"{x['output_tokens_per_s']:,.1f}",
                "-",
                "-",
                note,
            ]
        )
    return out


def _device(summary: dict) -> str:
    """The device the items ran on, as the first result that names one says."""
    for rec in summary["items"]:
        r = rec["result"]
        r = r.get("ours", r) if isinstance(r, dict) else r
        r = r[0] if isinstance(r, list) else r
        if isinstance(r, dict) and "device" in r:
            return r["device"]
    return "no device"


def markdown(summary: dict) -> str:
    """The suite's table (docs/performance.md format)."""
    env = summary.get("env", {})
    if env.get("QWENVL_NO_COMPILER_FLAGS"):
        flags = "without the trainer's XLA flags"
    elif env.get("XLA_FLAGS"):
        flags = f"XLA_FLAGS {env['XLA_FLAGS']}"
    else:
        flags = "no XLA flags"
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" in env:
        flags += f", memory fraction {env['XLA_PYTHON_CLIENT_MEM_FRACTION']}"
    head = (
        f"Device suite on {_device(summary)}"
        + (" (tiny CPU shapes)" if summary["tiny"] else "")
        + ", "
        + ", ".join(f"{k} {x}" for k, x in summary["versions"].items())
        + f"; {flags}"
        + "\n\n| item | shape | attention | remat | s/step | tokens/s | MFU | peak GB | notes |\n"
        + "|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "".join("| " + " | ".join(r) + " |\n" for r in rows(summary))
