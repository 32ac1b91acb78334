"""Data preparation as the paper did it (Appendix A): tools that write what the trainer reads.

`python -m qwenvl_jax.prep COMMAND --input=SHARDS --output=DIR [--runner=...]` (see `__main__`).

Writing a step and a command (for whoever adds one):

1. A step is a plain function `fn(record: dict, ctx: steps.Context) -> iterable of dicts`; yield
   the record to keep it, `raise steps.Drop("reason")` (or yield nothing) to drop it; take
   randomness only from `ctx.rng` (seeded per shard, so every runner gives the same bytes); count
   non-drop events with `ctx.count("name")`. Put thresholds in a frozen dataclass or a
   `functools.partial` so the function pickles for Beam (no lambdas, no open files in closures).
   Wrap it as `steps.Step("name", fn)`; `batch_size=` / `whole_shard=True` for batched models and
   grouping (`steps.py`).
2. A reader yields input records (`shards.read_shard` handles `.tar`, `.parquet`, `.jsonl`; write
   yours as `path -> iterator of dicts` when the input is a PDF or an HTML page); an image is
   encoded bytes under `"image"` with its extension under `"image_ext"`; the writer stores it and
   puts the relative path in the line. Keys starting with `_` are scratch and are not written.
   The output lines must be records of a trainer task (`qwenvl_jax/data/tasks.py`: OCR is
   `{"image", "lines": [{"text", "quad": [8 pixel numbers]}]}` with `box_format` xyxy_pixel).
3. A command is a module with `HELP` (one line), `add_arguments(parser)` (its own flags; the
   shared --input/--output/--runner/--seed are added for you) and `run(args, pipeline_args)`,
   which builds the step list and calls `runner.run(steps, args.input, args.output,
   seed=args.seed, runner=args.runner, pipeline_args=pipeline_args, reader=...,
   mixture={"ocr": {"task": "ocr", "box_format": "xyxy_pixel"}})`. Register it by name in
   `__main__.COMMANDS`. User mistakes raise `errors.ConfigError` (one line, exit 2).
4. Tests: run the steps through `runner.run(..., runner="inprocess")` (or the command through
   `__main__.main([...])`) on a fixture the test writes; `tests/prep/conftest.py` and
   `tests/prep_pairs.py` hold the shared A.1 fixture.

Modules: `steps` (Step, Drop, Context, run_steps), `shards` (readers, writer, done markers),
`runner` (in-process and Beam runs, progress, report and mixture), `pairs` (A.1), `vqa`, `grit`,
`refexp` (A.2, A.3), `boxes` (validated boxes on the 1000-grid), `clip_score` (the CLIP scorer),
`bench` (throughput per step); the OCR commands `ocr_synth`, `pdf`, `html`. docs/prep.md.
"""
