"""megakv-convert refuses a non-empty output directory before doing any work."""

from __future__ import annotations

import struct

import pytest

from megakv.cli.convert import main as convert_main


@pytest.mark.parametrize("command", ["from-checkpoint", "from-hf", "to-hf", "to-hf-rcla"])
def test_an_existing_output_is_refused_before_the_source_is_read(tmp_path, capsys, command):
    source = tmp_path / "source"  # not even a valid source: the output check must come first
    source.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert convert_main([command, str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} already exists and is not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # with --overwrite the (invalid) source is what is reported
    assert convert_main([command, str(source), str(out), "--overwrite"]) == 2
    assert "already exists" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["from-checkpoint", "from-hf", "to-hf", "to-hf-rcla"])
def test_the_input_or_a_directory_holding_it_is_never_the_output(tmp_path, capsys, command):
    """`megakv-convert from-checkpoint runs/X runs/X --overwrite` deleted the run (checkpoints, logs) and exited 0
    (found by a user-journey audit); `from-hf hf hf --overwrite` removed the original transformers files."""
    source = tmp_path / "models" / "source"
    source.mkdir(parents=True)
    (source / "keep.txt").write_text("precious")
    for out in (source, tmp_path / "models", tmp_path / "models" / "source" / ".." / "source"):
        assert convert_main([command, str(source), str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "writing it would delete the input" in err, err
    (source / "checkpoints").mkdir()  # `from-checkpoint RUN RUN/checkpoints --overwrite` deleted the checkpoints
    (source / "checkpoints" / "step_1").write_text("weights")
    assert convert_main([command, str(source), str(source / "checkpoints"), "--overwrite"]) == 2
    assert "would delete part of the input" in capsys.readouterr().err
    (source / "model").mkdir()  # a previous export inside the run may be replaced: it is no part of the input
    (source / "model" / "config.yaml").write_text("n_layers: 2\n")
    assert convert_main([command, str(source), str(source / "model"), "--overwrite"]) == 2
    assert "inside the input" not in capsys.readouterr().err  # refused for the invalid source, not the output
    assert convert_main([command, str(source), str(source / "keep.txt"), "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (source / "keep.txt").read_text() == "precious" and (source / "checkpoints" / "step_1").is_file()


def test_to_universal_passes_deepspeeds_progress_on_and_keeps_its_end_for_errors(capsys):
    """ds_to_universal's output (its progress bars) was captured whole and shown only on failure: a conversion
    of a large run sat silent for minutes."""
    import sys

    from megakv.train.export import run_showing_progress

    code, tail = run_showing_progress([sys.executable, "-c", "import sys\nfor i in range(3): print(f'shard {i}')\n"
                                       "sys.exit(3)"], keep_chars=16)
    assert code == 3 and tail == "shard 1\nshard 2\n"
    assert capsys.readouterr().err == "shard 0\nshard 1\nshard 2\n"


def test_a_config_json_nested_too_deeply_is_named_not_a_traceback(tmp_path, capsys):
    """200,000 '[' in config.json: a RecursionError traceback from json (security audit)."""
    source = tmp_path / "hf"
    source.mkdir()
    (source / "config.json").write_text("[" * 200_000)
    assert convert_main(["from-hf", str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {source / 'config.json'} holds JSON nested too deeply to read" in err and "Fix:" in err
    assert "Traceback" not in err


# A GGUF header whose one metadata value claims an array of 2**40 uint8 (the audit's crafted file, 68 bytes).
CRAFTED_GGUF = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 20) + b"general.architecture"
                + struct.pack("<IIQ", 9, 10, 2**40))


def test_a_crafted_gguf_is_named_not_a_traceback(tmp_path, capsys):
    """transformers' GGUF reader raised struct.error (a traceback) on an array count of 2**40. The reader (gguf,
    accelerate) is one of the study's extras: the plain install (CI's) is told what to install instead."""
    from megakv.hf import gguf

    crafted = tmp_path / "a.gguf"
    crafted.write_bytes(CRAFTED_GGUF)
    assert convert_main(["from-gguf", str(tmp_path / "out"), "--gguf", str(crafted)]) == 2
    err = capsys.readouterr().err
    try:
        gguf.require_gguf_reader()
    except gguf.MissingAssetError:
        assert "pip install" in err and "Traceback" not in err and not (tmp_path / "out").exists()
        return
    assert f"error: {crafted} is damaged or not a GGUF file: its metadata cannot be read" in err
    assert "Fix: download or copy the file again" in err and "Traceback" not in err
