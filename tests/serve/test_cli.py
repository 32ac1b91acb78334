"""`python -m qwenvl_jax.serve`: flag errors are one line and exit 2, before any model loads."""

import pytest

from qwenvl_jax.serve.__main__ import main


@pytest.mark.parametrize(
    "argv,words",
    [
        ([], "the following arguments are required: --checkpoint"),
        (["--checkpoint=/no/such/dir"], "--checkpoint=/no/such/dir: no such file or directory"),
        (["--checkpoint=.", "--max_batch=0"], "--max_batch: invalid positive int value: '0'"),
        (["--checkpoint=.", "--port=70000"], "--port=70000 is not a TCP port"),
        (["--checkpoint=.", "--mesh=pipeline=2"], "'pipeline' is not a mesh axis"),
        (["--checkpoint=.", "--quantize=int3"], "argument --quantize: invalid choice: 'int3'"),
        (["--checkpoint=.", "--allowed_local_dir=/no/dir"], "--allowed_local_dir=/no/dir: not a"),
        (["--checkpoint=.", "--bogus=1"], "unrecognized arguments: --bogus=1"),
    ],
)
def test_flag_errors_are_one_line(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_bench_random_model_checkpoint_loads(tmp_path):
    # `bench --mode=serve --random_model=tiny-d64` serves this directory: it must load as a
    # checkpoint of that shape (d=64, the real vocabulary).
    from qwenvl_jax import QwenVL
    from qwenvl_jax.serve.bench import write_random_checkpoint

    path = write_random_checkpoint("tiny-d64", str(tmp_path / "d64"))
    model = QwenVL.from_pretrained(path, dtype="float32")
    assert model.config.hidden_size == 64 and model.config.vocab_size == 151936
    assert model.config.visual.output_dim == 64
