"""What a user sees and finds on disk after a run: no empty output folder from a failed start,
log lines that do not break the progress bar."""

import shutil

from sdjax.cli import main
from tests.conftest import DEMO_DATA
from tests.helpers import error_line


def test_a_wrong_model_path_leaves_no_output_dir(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--pretrained_model_name_or_path", str(tmp_path / "no-such-model"),
                 f"--train_data_dir={DEMO_DATA}", "--resolution=64", "--train_batch_size=1",
                 f"--output_dir={out}"])
    assert code == 2
    assert "no-such-model" in error_line(capsys.readouterr().err)
    assert not out.exists()


def test_warnings_do_not_break_the_progress_bar(tmp_path, capsys):
    data = shutil.copytree(DEMO_DATA, tmp_path / "data")
    (data / "05_green_square.png").write_bytes(b"not a png")
    assert main(["--pretrained_model_name_or_path=tiny", f"--train_data_dir={data}",
                 "--resolution=32", "--train_batch_size=1", "--max_train_steps=3",
                 "--checkpointing_steps=100", "--report_to=none", "--max_bad_images=1",
                 f"--output_dir={tmp_path / 'out'}"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if "skipped unreadable" in line]
    assert lines, err
    for line in lines:
        # tqdm redraws with carriage returns: what remains visible of a line is its last
        # segment. The warning must be that whole segment, not glued to the bar.
        visible = line.split("\r")[-1]
        assert visible.startswith("skipped unreadable") and "05_green_square.png" in visible, line
        assert "steps:" not in visible
