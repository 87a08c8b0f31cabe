"""The run's history and curves.png: one row per epoch, a re-run epoch replaces its row, on S3 too."""

from __future__ import annotations

import io
import math

from PIL import Image

from basnet import storage
from basnet.train.curves import CURVES_FILE, CURVES_SIZE, HISTORY_FILE, plot_curves, read_history, record_epoch


def epoch(n: int, loss: float = math.nan) -> dict:
    return {"epoch": n, "train_loss": loss, "val_mae": 0.5 / (n + 1), "val_max_f": 0.2 + 0.1 * n,
            "images_per_s": 2.5, "val_images": 16, "checkpoint": "ignored"}


def test_history_has_one_row_per_epoch_and_a_rerun_epoch_replaces_the_rows_from_it(tmp_path):
    run = str(tmp_path / "run")
    record_epoch(run, epoch(0))
    for n in (1, 2, 3):
        record_epoch(run, epoch(n, 10.0 / n))
    # a crash after epoch 3's history but before its checkpoint: the restart runs epoch 3 again
    record_epoch(run, epoch(3, 2.0))
    history = read_history(run)
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert history[0]["train_loss"] is None and history[3]["train_loss"] == 2.0
    assert set(history[1]) == {"epoch", "train_loss", "val_mae", "val_max_f", "images_per_s"}
    record_epoch(run, epoch(2, 4.0))  # a resume from epoch 1's checkpoint drops 2 and 3, then redoes 2
    assert [r["epoch"] for r in read_history(run)] == [0, 1, 2]
    picture = Image.open(tmp_path / "run" / CURVES_FILE)
    assert (picture.format, picture.size) == ("PNG", CURVES_SIZE)


def test_curves_draw_from_a_single_untrained_epoch_and_on_s3(s3_bucket):
    assert Image.open(io.BytesIO(plot_curves([{"epoch": 0, "train_loss": None, "val_mae": 0.5, "val_max_f": 0.1,
                                               "images_per_s": 0}]))).size == CURVES_SIZE
    run = f"{s3_bucket}/runs/demo"
    record_epoch(run, epoch(0))
    record_epoch(run, epoch(1, 3.0))
    assert [r["epoch"] for r in read_history(run)] == [0, 1]
    assert storage.exists(storage.join(run, HISTORY_FILE)) and storage.exists(storage.join(run, CURVES_FILE))


def test_tensorboard_events_on_s3_are_copied_up_every_epoch_and_a_resumed_run_replaces_later_steps(s3_bucket,
                                                                                                    tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from basnet.train.tracking import TENSORBOARD_DIR, open_tracker

    run = f"{s3_bucket}/runs/tb"
    tracker = open_tracker("tensorboard", run_uri=run, name="tb", rank=0)
    tracker.config({"lr": 0.001})
    tracker.step(1, 2.5, 0.001)
    tracker.epoch(1, {"train_loss": 2.5, "val_mae": 0.25, "val_max_f": 0.5, "images_per_s": 3.0}, 0.001)

    def pulled() -> EventAccumulator:
        remote = storage.join(run, TENSORBOARD_DIR)
        local = tmp_path / "pulled"
        local.mkdir(exist_ok=True)
        for uri in storage.list_files(remote):
            (local / uri.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(uri))
        return EventAccumulator(str(local)).Reload()

    events = pulled()  # after the first epoch, before close
    assert [e.value for e in events.Scalars("epoch/val_mae")] == [0.25]
    assert [(e.step, e.value) for e in events.Scalars("step/loss")] == [(1, 2.5)]
    tracker.epoch(2, {"train_loss": 2.0, "val_mae": 0.125, "val_max_f": 0.75, "images_per_s": 3.0}, 0.001)
    tracker.step(9, 1.5, 0.001)  # after the last epoch: close() takes it up
    tracker.close()
    events = pulled()
    assert [(e.step, e.value) for e in events.Scalars("epoch/val_mae")] == [(1, 0.25), (2, 0.125)]
    assert [(e.step, e.value) for e in events.Scalars("step/loss")] == [(1, 2.5), (9, 1.5)]

    # Step 9 came from epoch 3, which the run did not finish: resumed from epoch 2's checkpoint (in a
    # new process: a new event file), it logs step 9 again, and TensorBoard shows the new value alone.
    resumed = open_tracker("tensorboard", run_uri=run, name="tb", rank=0, resume_step=9)
    resumed.config({"lr": 0.001})
    resumed.step(9, 1.25, 0.001)
    resumed.epoch(3, {"train_loss": 1.25, "val_mae": 0.0625, "val_max_f": 0.875, "images_per_s": 3.0}, 0.001)
    resumed.close()
    events = pulled()
    assert [(e.step, e.value) for e in events.Scalars("step/loss")] == [(1, 2.5), (9, 1.25)]
    assert [e.value for e in events.Scalars("epoch/val_mae")] == [0.25, 0.125, 0.0625]
    assert len(events.Tensors("config/text_summary")) == 2  # each process logs the resolved config
