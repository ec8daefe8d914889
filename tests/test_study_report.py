"""megakv-study's report and command line, on hand-made part results (the parts are tested on their own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megakv.cli.study import main, selected_parts
from megakv.study.report import write_report
from megakv.study.results import Claim, PartResult, Table


def _result(part: str, held: bool | None) -> PartResult:
    return PartResult(part=part, title=f"{part} title", scale="tiny", seconds=90.0, settings={"steps": 2},
                      tables=[Table("loss by retention", ["model", "every:1", "every:2"],
                                    [["rcla", 2.5, 2.61234], ["normal|x", 2.4, None]])],
                      claims=[Claim("R-CLA stays close at 50%", "lossless at 50%", "+4.5%", held)],
                      plots=["loss.png"], notes=["two steps only"])


def test_results_round_trip_and_report_marks_each_claim(tmp_path):
    out = tmp_path / "study"
    for part, held in (("finetune", True), ("ablation", False)):
        _result(part, held).save(out / part)
        (out / part / "loss.png").write_bytes(b"\x89PNG fake image bytes")
    assert PartResult.load(out / "finetune") == _result("finetune", True)

    report = write_report(out, ["finetune", "pretrain", "ablation"], tmp_path / "committed", "megakv-study all")
    text = report.read_text()
    assert report == tmp_path / "committed" / "report.md"
    assert "1 of 2 claims held" in text
    assert "| R-CLA stays close at 50% | lossless at 50% | +4.5% | **held** |" in text
    assert "| R-CLA stays close at 50% | lossless at 50% | +4.5% | **not held** |" in text
    assert "| rcla | 2.5 | 2.612 |" in text and "| normal\\|x | 2.4 | – |" in text  # escaped, missing cell
    assert "Not run yet: pretrain." in text
    assert text.index("finetune title") < text.index("ablation title")
    for part in ("finetune", "ablation"):  # PNGs copied beside the report, linked relative to it
        assert f"![loss.png]({part}/loss.png)" in text
        assert (tmp_path / "committed" / part / "loss.png").read_bytes() == b"\x89PNG fake image bytes"
    assert "kept from an earlier invocation" not in text


def test_a_part_rerun_alone_refreshes_its_section_and_keeps_the_others(tmp_path):
    committed, first, second = tmp_path / "committed", tmp_path / "first", tmp_path / "second"
    for part in ("finetune", "ablation"):
        result = _result(part, True)
        result.finished = "2026-01-01 10:00 UTC"
        result.save(first / part)
        (first / part / "loss.png").write_bytes(f"{part} old plot".encode())
    write_report(first, ["finetune", "pretrain", "ablation"], committed)
    assert PartResult.load(committed / "finetune").finished == "2026-01-01 10:00 UTC"  # results kept beside it

    rerun = _result("ablation", False)  # only the ablation rerun, into another OUT
    rerun.finished = "2026-02-02 12:00 UTC"
    rerun.save(second / "ablation")
    (second / "ablation" / "loss.png").write_bytes(b"ablation new plot")
    text = write_report(second, ["finetune", "pretrain", "ablation"], committed).read_text()
    finetune, ablation = text.split("## finetune title")[1].split("## ablation title")
    assert "Results built 2026-01-01 10:00 UTC: kept from an earlier invocation" in finetune
    assert "**held**" in finetune and "**not held**" in ablation and "1 of 2 claims held" in text
    assert "Results built 2026-02-02 12:00 UTC." in ablation and "kept from" not in ablation
    assert (committed / "finetune" / "loss.png").read_bytes() == b"finetune old plot"
    assert (committed / "ablation" / "loss.png").read_bytes() == b"ablation new plot"
    assert PartResult.load(committed / "ablation") == rerun


def test_a_part_not_run_now_comes_from_the_report_and_mixed_scales_are_said(tmp_path, monkeypatch):
    """`megakv-study pretrain --out A --report-dir R` replaced R's cpu ablation with an older tiny one lying in A,
    unmarked, and counted claims across scales (study audit). Parts not run now come from the report's copy and
    are marked kept; claims are counted per scale when the scales differ."""
    out, committed = tmp_path / "A", tmp_path / "R"
    for part, scale in (("finetune", "cpu"), ("ablation", "cpu")):
        result = _result(part, True)
        result.scale = scale
        result.save(committed / part)
        (committed / part / "loss.png").write_bytes(b"cpu plot")
    old = _result("ablation", False)  # an older tiny run lying in OUT
    old.save(out / "ablation")
    (out / "ablation" / "loss.png").write_bytes(b"tiny plot")
    _result("pretrain", False).save(out / "pretrain")  # this invocation's part, at scale tiny
    (out / "pretrain" / "loss.png").write_bytes(b"pretrain plot")
    text = write_report(out, ["finetune", "pretrain", "ablation"], committed, ran=["pretrain"]).read_text()
    assert PartResult.load(committed / "ablation").scale == "cpu"
    assert (committed / "ablation" / "loss.png").read_bytes() == b"cpu plot"
    sections = text.split("## ")
    assert "kept from an earlier invocation" in sections[1] and "kept from" not in sections[2]  # finetune, pretrain
    assert "kept from an earlier invocation" in sections[3]
    assert "**The parts come from different scales** (finetune cpu, pretrain tiny, ablation cpu)" in text
    assert "scale cpu: 2 of 2 claims held; scale tiny: 0 of 1 claims held" in text
    # the same directory spelled two ways is not a copy onto itself (shutil.SameFileError)
    monkeypatch.chdir(tmp_path)
    relative = write_report(Path("R"), ["finetune", "pretrain", "ablation"], committed)
    assert relative.read_text().count("kept from") == 0


def test_a_report_file_that_is_not_the_studys_is_left_alone(tmp_path):
    out = tmp_path / "study"
    _result("finetune", True).save(out / "finetune")
    (out / "finetune" / "loss.png").write_bytes(b"plot")
    (out / "report.md").write_text("# my own notes\n")
    with pytest.raises(FileExistsError, match="not a megakv-study report"):
        write_report(out, ["finetune"])
    assert (out / "report.md").read_text() == "# my own notes\n"
    (out / "report.md").unlink()
    first = write_report(out, ["finetune"]).read_text()
    assert write_report(out, ["finetune"]).read_text() == first  # its own report is rewritten, whole
    assert sorted(p.name for p in out.iterdir()) == ["finetune", "report.md"]  # no temporary left


def test_parts_run_in_the_papers_order_and_bad_names_are_refused():
    assert selected_parts(["ablation", "finetune"]) == ["finetune", "ablation"]
    assert selected_parts(["all"]) == ["finetune", "pretrain", "ablation"]
    with pytest.raises(ValueError, match="unknown study part"):
        selected_parts(["table2"])
    with pytest.raises(ValueError, match="give it alone"):
        selected_parts(["report", "finetune"])


def test_command_line_errors_exit_2_and_name_the_fix(tmp_path, capsys):
    assert main(["table2", "--out", str(tmp_path)]) == 2
    assert "choose from finetune, pretrain, ablation" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "empty")]) == 2
    assert "run `megakv-study` first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--scale", "huge"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("content", ["[1, 2]", "{}", "\x00\x01 not json"])
def test_a_damaged_results_file_is_named(tmp_path, capsys, content):
    """`megakv-study report` over a results.json that is a list, an empty object or garbage was a traceback."""
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "results.json").write_text(content)
    assert main(["report", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'finetune' / 'results.json'} is not a study part's results" in err and "Traceback" not in err
