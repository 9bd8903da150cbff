"""What a run writes besides checkpoints: loss.png written whole (no temp file left beside it) and
a CSV log that never overwrites an earlier run's metrics."""

from finetune.training.logs import _fresh_csv_version, plot_losses
from finetune.training.state import RunState


def test_loss_plot_is_a_png_written_whole(tmp_path):
    state = RunState(step=3, losses=[(1, 2.5), (2, 2.1), (3, 1.9)], val_losses=[(3, 2.0)])
    out = tmp_path / "loss.png"
    out.write_bytes(b"an older plot")
    plot_losses(state, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]
    plot_losses(RunState(), out)  # no step yet: an empty plot, still a PNG
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_csv_log_of_a_resumed_run_goes_beside_the_first(tmp_path):
    logs = tmp_path / "logs"
    assert _fresh_csv_version(logs) == ""
    logs.mkdir()
    (logs / "metrics.csv").write_text("step,loss\n")
    assert _fresh_csv_version(logs) == "run-2"
    (logs / "run-2").mkdir()
    assert _fresh_csv_version(logs) == "run-3"
