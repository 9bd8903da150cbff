"""What a run writes besides checkpoints: loss.png written whole (no temp file left beside it) and
one metrics.csv per run, appended across resumes and kept through a full disk."""

import csv
import os

from finetune.training.logs import HistoryCSV, plot_losses
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


def test_history_csv_is_one_file_appended_across_resumes(tmp_path, monkeypatch):
    out = tmp_path
    h = HistoryCSV(out)
    for step in (1, 2, 3):
        h.log_metrics({"train_loss": 3.0 - step, "lr": 0.1}, step=step)
    h.save()  # the loop saves before each checkpoint: say at step 3
    h.log_metrics({"train_loss": 0.5}, step=4)  # then kill -9: step 4 never reaches the file
    h2 = HistoryCSV(out)  # the resumed process, from the step-3 checkpoint
    h2.start_at(3)
    h2.log_metrics({"train_loss": 0.4}, step=4)
    h2.log_metrics({"val_loss": 0.9}, step=4)  # a new column: the header grows, old rows keep theirs
    h2.finalize("success")
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "4"]
    assert rows[3]["train_loss"] == "0.4" and rows[4]["val_loss"] == "0.9" and rows[0]["lr"] == "0.1"
    # a resume from an earlier checkpoint drops the rows past it (they are trained and logged again)
    HistoryCSV(out).start_at(2)
    assert [r["step"] for r in csv.DictReader((out / "logs" / "metrics.csv").open())] == ["1", "2"]


def test_history_csv_survives_a_full_disk(tmp_path, monkeypatch, capsys):
    from finetune import fs

    h = HistoryCSV(tmp_path)
    h.log_metrics({"train_loss": 1.0}, step=1)
    h.save()
    h.log_metrics({"train_loss": 0.5}, step=2)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    h.save()  # disk full at a checkpoint: the earlier rows stay, this one waits
    assert "could not write" in capsys.readouterr().err
    assert [r["step"] for r in csv.DictReader((tmp_path / "logs" / "metrics.csv").open())] == ["1"]
    monkeypatch.undo()
    h.save()
    assert [r["step"] for r in csv.DictReader((tmp_path / "logs" / "metrics.csv").open())] == ["1", "2"]
    assert fs  # noqa


def test_history_csv_is_written_between_checkpoints_too(tmp_path, monkeypatch):
    # A long run with train.save_every=0 can be watched: rows reach the file every flush_seconds.
    h = HistoryCSV(tmp_path)
    h.log_metrics({"train_loss": 2.0}, step=1)
    assert not (tmp_path / "logs" / "metrics.csv").exists()
    monkeypatch.setattr(HistoryCSV, "flush_seconds", 0.0)
    h.log_metrics({"train_loss": 1.5}, step=2)
    assert [r["step"] for r in csv.DictReader((tmp_path / "logs" / "metrics.csv").open())] == ["1", "2"]
