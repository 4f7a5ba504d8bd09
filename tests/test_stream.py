"""Streaming data sets (--streaming): disjoint host shares, epochs, exact resume, bad records."""

import shutil

import numpy as np
import pytest

from sdjax.cli import main
from sdjax.data.stream import StreamLoader, open_stream
from sdjax.errors import ConfigError
from tests.conftest import DEMO_DATA
from tests.tiny_torch import TINY_TOKENIZER


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TINY_TOKENIZER)


def _loader(tokenizer, host=0, hosts=1, data=DEMO_DATA, **extra):
    stream, where = open_stream(str(data), None, None, "image", "text")
    options = dict(global_batch=4, accumulation_steps=1, process_index=host, process_count=hosts,
                   seed=1, resolution=32, center_crop=True, random_flip=True,
                   shuffle_buffer_size=5)
    options.update(extra)
    return StreamLoader(stream, where, "image", "text", tokenizer, **options)


def _samples(loader, start, steps):
    batches = loader.iterate(start)
    out = [next(batches) for _ in range(steps)]
    batches.close()
    return out


def test_hosts_stream_disjoint_shares_epoch_after_epoch(tokenizer):
    hosts = [_loader(tokenizer, host=h, hosts=2) for h in range(2)]
    seen = [[tuple(ids) for b in _samples(h, 0, 6) for ids in b["input_ids"][0]] for h in hosts]
    for epoch in range(2):  # 12 records / 2 hosts / 2 rows: 3 steps per epoch
        shares = [s[6 * epoch:6 * epoch + 6] for s in seen]
        assert not set(shares[0]) & set(shares[1])
        assert len(set(shares[0]) | set(shares[1])) == 12  # every caption once in the epoch
    assert seen[0][6:] != seen[0][:6]  # each epoch reshuffled


def test_resume_is_exact(tokenizer):
    loader = _loader(tokenizer, accumulation_steps=2)
    straight = _samples(loader, 0, 5)
    resumed = _samples(_loader(tokenizer, accumulation_steps=2), 3, 2)
    for a, b in zip(straight[3:], resumed):
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_unreadable_records_are_replaced_and_limited(tokenizer, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(DEMO_DATA, data)
    victim = sorted(data.glob("*.png"))[4]
    victim.write_bytes(victim.read_bytes()[:50])
    before = victim.read_bytes()
    batches = _samples(_loader(tokenizer, data=data), 0, 3)  # one epoch holds the bad record
    assert all(b["pixel_values"].shape == (1, 4, 32, 32, 3) for b in batches)
    assert "skipped an unreadable image" in caplog.text
    with pytest.raises(ConfigError, match="more than --max_bad_images=0"):
        _samples(_loader(tokenizer, data=data, max_bad_images=0), 0, 3)
    assert victim.read_bytes() == before


def test_training_from_a_stream(tmp_path, capsys):
    args = (f"--pretrained_model_name_or_path=tiny --dataset_name={DEMO_DATA} --streaming "
            "--resolution=32 --center_crop --train_batch_size=1 --max_train_steps=2 "
            f"--output_dir={tmp_path / 'run'}").split()
    assert main(args) == 0
    assert f"data: streaming {DEMO_DATA}" in capsys.readouterr().out
    assert (tmp_path / "run" / "model_index.json").exists()
    assert main([a for a in args if not a.startswith("--max_train_steps")]) == 2
    assert "--streaming needs --max_train_steps" in capsys.readouterr().err
    assert main(args + ["--enable_bucket"]) == 2
    assert "--enable_bucket needs random access" in capsys.readouterr().err


def test_stream_column_errors():
    with pytest.raises(ConfigError, match="--caption_column 'caption' is not a column of .* its "
                                          "columns are image, text"):
        open_stream(DEMO_DATA, None, None, "image", "caption")
    with pytest.raises(ConfigError, match="cannot stream the data set /no/such/set"):
        open_stream("/no/such/set", None, None, "image", "text")
