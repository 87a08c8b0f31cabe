"""The evaluation job: metrics against pysodmetrics and the relaxFb definition, reports, Ray, S3, weights."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pysod_reference import pysod_metrics
from scipy import ndimage
from scipy.stats import spearmanr

from basnet import storage
from basnet.data.sample import generate_sample, make_example
from basnet.evaluate.matching import prepare_folders
from basnet.evaluate.report import PLOT_SIZE, metrics_table, sheet_size, write_report
from basnet.evaluate.scoring import evaluate_folders, score_pairs
from basnet.metrics import METRIC_KEYS, image_scores
from basnet.quality import QUALITY_COLUMNS
from basnet.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))
import evaluate as evaluate_job  # noqa: E402

N_IMAGES = 10


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _load(path: Path | str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def _imperfect(gt: np.ndarray, i: int) -> np.ndarray:
    """A prediction that is close but wrong: the mask shifted by 0-2 px and blurred."""
    shifted = np.roll(gt, (i % 3, 1 + i % 2), axis=(0, 1)).astype(np.float64)
    return np.clip(np.rint(ndimage.gaussian_filter(shifted, 0.8 + 0.4 * (i % 3))), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A DUTS-TE layout (images, binary masks) plus pred/ (imperfect), same/ (= gt), inverted/."""
    root = tmp_path_factory.mktemp("evalset")
    for i in range(N_IMAGES):
        rng = np.random.default_rng([7, i])
        image, soft = make_example(32 + 4 * (i % 3), 40 - 4 * (i % 2), rng)
        gt = np.where(soft > 128, 255, 0).astype(np.uint8)  # binary, so identical folders score MAE 0
        name = f"im{i:02d}"
        _save(root / "DUTS-TE/DUTS-TE-Image" / f"{name}.jpg", image)
        _save(root / "DUTS-TE/DUTS-TE-Mask" / f"{name}.png", gt)
        _save(root / "pred" / f"{name}.png", _imperfect(gt, i))
        _save(root / "same" / f"{name}.png", gt)
        _save(root / "inverted" / f"{name}.png", 255 - gt)
    return root


def _files(generated: Path, folder: str) -> list[tuple[np.ndarray, np.ndarray]]:
    masks = sorted((generated / "DUTS-TE/DUTS-TE-Mask").glob("*.png"))
    return [(_load(generated / folder / m.name), _load(m)) for m in masks]


def _boundary(mask: np.ndarray) -> np.ndarray:
    """mask XOR its 3x3 erosion, outside the image counting as background."""
    h, w = mask.shape
    padded = np.pad(mask, 1, constant_values=False)
    eroded = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            eroded &= padded[dy:dy + h, dx:dx + w]
    return mask ^ eroded


def _within(points: np.ndarray, targets: np.ndarray, radius: float = 3) -> float:
    """Brute force: share of ``points`` pixels with a ``targets`` pixel at Euclidean distance <= radius."""
    p, t = np.argwhere(points), np.argwhere(targets)
    nearest = ((p[:, None, :] - t[None, :, :]) ** 2).sum(-1).min(axis=1)
    return float(np.mean(nearest <= radius**2))


def _relax_f(pred: np.ndarray, gt: np.ndarray) -> float:
    """The paper's relaxFb written from its definition: binarise at 0.5, 3 px slack, beta^2 0.3."""
    pred_edge, gt_edge = _boundary(pred / 255.0 > 0.5), _boundary(gt > 128)
    if not pred_edge.any() or not gt_edge.any():
        return float(not pred_edge.any() and not gt_edge.any())
    precision, recall = _within(pred_edge, gt_edge), _within(gt_edge, pred_edge)
    return 0.0 if precision + recall == 0 else 1.3 * precision * recall / (0.3 * precision + recall)


def _report(generated: Path, folder: str, out: Path, **kwargs) -> dict:
    evaluation = evaluate_folders(str(generated / folder), str(generated))
    write_report(evaluation, str(out), **kwargs)
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def report(generated, tmp_path_factory) -> tuple[Path, dict]:
    """The single-process report of pred/ (imperfect predictions), 4 rows per contact sheet."""
    out = tmp_path_factory.mktemp("report")
    return out, _report(generated, "pred", out, sheet_rows=4)


def test_metrics_json_equals_pysodmetrics_on_the_same_files(generated, report):
    _, doc = report
    expected, _ = pysod_metrics(_files(generated, "pred"))
    assert set(doc["metrics"]) == set(METRIC_KEYS)
    for key, value in expected.items():
        assert doc["metrics"][key] == pytest.approx(float(value), rel=1e-12, abs=1e-12), key
    assert 0.0 < doc["metrics"]["mae"] < 0.3 and doc["metrics"]["max_f"] < 1.0  # imperfect indeed


def test_relax_boundary_f_equals_an_independent_implementation_of_its_definition(generated, report):
    _, doc = report
    expected = np.mean([_relax_f(pred, gt) for pred, gt in _files(generated, "pred")])
    assert doc["metrics"]["relax_boundary_f"] == pytest.approx(expected, rel=1e-12)
    shifted_far = [(np.roll(gt, 6, axis=1), gt) for _, gt in _files(generated, "pred")]
    far = _relax_f_of_sodmetrics(shifted_far)
    assert far == pytest.approx(np.mean([_relax_f(p, g) for p, g in shifted_far]), rel=1e-12)
    assert far < expected  # beyond the 3 px slack the boundaries stop matching


def _relax_f_of_sodmetrics(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    from basnet.metrics import SODMetrics

    metrics = SODMetrics()
    for pred, gt in pairs:
        metrics.update(pred, gt)
    return metrics.compute()["relax_boundary_f"]


def test_metrics_json_records_dataset_counts_and_paper_row(generated, report):
    _, doc = report
    assert doc["dataset"] == str(generated) and doc["predictions"] == str(generated / "pred")
    assert doc["checkpoint"] is None
    assert doc["counts"] == {"images": N_IMAGES, "pairs": N_IMAGES, "preds_without_gt": 0,
                             "gt_without_pred": 0, "resized": 0, "unreadable": 0}
    assert doc["paper"]["max_f"] == 0.860 and doc["paper"]["relax_boundary_f"] == 0.758
    assert doc["paper"]["mae"] == 0.047


def test_identical_folders_give_mae_0_max_f_1_and_s_measure_1(generated, tmp_path):
    metrics = _report(generated, "same", tmp_path)["metrics"]
    assert metrics["mae"] == 0.0
    assert metrics["max_f"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["s_measure"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["relax_boundary_f"] == 1.0


def test_inverted_prediction_scores_worse_on_every_metric(generated, report, tmp_path):
    imperfect = report[1]["metrics"]
    inverted = _report(generated, "inverted", tmp_path)["metrics"]
    assert inverted["mae"] > imperfect["mae"]
    for key in METRIC_KEYS:
        if key != "mae":
            assert inverted[key] < imperfect[key], key


def test_per_image_parquet_holds_mae_and_f_of_every_image(generated, report):
    out, _ = report
    table = pd.read_parquet(out / "per_image.parquet")
    assert len(table) == N_IMAGES and {"key", "mae", "max_f", "height", "width"} <= set(table.columns)
    for row, (pred, gt) in zip(table.sort_values("key").itertuples(), _files(generated, "pred")):
        assert {"mae": row.mae, "max_f": row.max_f} == image_scores(pred, gt)
        assert (row.height, row.width) == gt.shape


def test_plots_and_contact_sheets_are_pngs_of_the_expected_size(report):
    out, _ = report
    for name in ("pr_curve.png", "f_curve.png"):
        with Image.open(out / name) as img:
            assert (img.format, img.size) == ("PNG", PLOT_SIZE) == ("PNG", (640, 480))
    sheets = {}
    for name in ("worst.png", "best.png"):
        with Image.open(out / name) as img:
            assert (img.format, img.size) == ("PNG", sheet_size(4)) == ("PNG", (532, 612))
            sheets[name] = np.asarray(img.convert("RGB"))
    assert not np.array_equal(sheets["worst.png"], sheets["best.png"])
    assert sheets["worst.png"].std() > 20  # pictures, not a blank canvas


def test_metrics_md_sets_the_run_beside_the_paper_row(report):
    out, doc = report
    text = (out / "metrics.md").read_text()
    table = metrics_table(doc["metrics"])
    assert table in text
    assert "| BASNet, paper (DUTS-TE) | 0.860 | 0.758 | 0.047 |" in table
    assert f"| this run | {doc['metrics']['max_f']:.3f} |" in table


def test_mismatches_are_counted_and_listed_and_odd_sizes_resized(tmp_path):
    gt_dir, pred_dir = tmp_path / "masks", tmp_path / "pred"
    rng = np.random.default_rng(3)
    for name in ("a", "b", "c", "d"):
        _save(gt_dir / f"{name}.png", np.where(make_example(32, 32, rng)[1] > 128, 255, 0).astype(np.uint8))
    _save(pred_dir / "a.png", _imperfect(_load(gt_dir / "a.png"), 1))
    _save(pred_dir / "b.png", np.asarray(Image.fromarray(_load(gt_dir / "b.png")).resize((48, 40))))
    (pred_dir / "c.png").write_bytes(b"not a png")
    _save(pred_dir / "e.png", _load(gt_dir / "a.png"))  # no ground truth named e
    evaluation = evaluate_folders(str(pred_dir), str(gt_dir))
    assert evaluation.counts() == {"images": 2, "pairs": 3, "preds_without_gt": 1, "gt_without_pred": 1,
                                   "resized": 1, "unreadable": 1}
    assert evaluation.matching.preds_without_gt == [str(pred_dir / "e.png")]
    assert evaluation.matching.gt_without_pred == [str(gt_dir / "d.png")]
    assert evaluation.scores.resized == ["b"] and evaluation.scores.unreadable == [str(pred_dir / "c.png")]
    assert {row["key"]: row["height"] for row in evaluation.scores.rows} == {"a": 32, "b": 32}


def test_flat_predictions_pair_with_nested_ground_truth_by_stem(generated, tmp_path):
    nested = tmp_path / "gt"
    for mask in (generated / "DUTS-TE/DUTS-TE-Mask").glob("*.png"):
        _save(nested / f"group{int(mask.stem[2:]) % 2}" / mask.name, _load(mask))
    matching = prepare_folders(str(generated / "pred"), str(nested))
    assert len(matching.pairs) == N_IMAGES and not matching.preds_without_gt and not matching.gt_without_pred
    assert all(Path(p.pred).name == Path(p.gt).name for p in matching.pairs)


@pytest.mark.ray
def test_parallel_evaluation_equals_single_process_exactly(ray_session, generated):
    from basnet.evaluate.ray_scoring import score_parallel

    pairs = prepare_folders(str(generated / "pred"), str(generated)).pairs
    single, parallel = score_pairs(pairs), score_parallel(pairs, blocks=4)
    assert len(set(parallel.tasks)) == 4  # four Ray tasks, each a partial result merged on the driver
    assert parallel.metrics.compute() == single.metrics.compute()
    single_curves, parallel_curves = single.metrics.curves(), parallel.metrics.curves()
    assert all(np.array_equal(single_curves[k], parallel_curves[k]) for k in single_curves)
    assert parallel.rows == single.rows


@pytest.mark.ray
def test_job_scores_s3_folders_and_writes_the_report_to_s3(ray_session, s3_bucket, generated, report, capsys):
    for path in sorted(generated.rglob("*")):
        rel = path.relative_to(generated).as_posix()
        if path.is_file() and rel.startswith(("pred/", "DUTS-TE/")):
            storage.write_bytes(storage.join(s3_bucket, rel), path.read_bytes())
    out = storage.join(s3_bucket, "eval")
    assert evaluate_job.main(["--pred", f"{s3_bucket}/pred", "--gt", s3_bucket, "--out", out]) == 0
    doc = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    assert doc["metrics"] == report[1]["metrics"]  # the parallel S3 run equals the local single-process one
    assert doc["parallel_tasks"] >= 2
    with Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "worst.png")))) as img:
        assert img.size == sheet_size(8)
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| BASNet, paper (DUTS-TE) |")


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> str:
    """A state-dict file of an untrained BASNet, in the published weights' format."""
    import torch

    from basnet.model import BASNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random_basnet.pth"
    torch.save(BASNet().state_dict(), path)
    return str(path)


@pytest.mark.ray
def test_weights_mode_predicts_then_scores_end_to_end_and_guided_refinement_beside_plain(
        ray_session, random_weights, tmp_path, capsys):
    data = generate_sample(str(tmp_path / "data"), n_train=2, n_test=3, size=(48, 64), seed=5, empty_every=2)
    out = tmp_path / "eval"
    argv = ["--weights", random_weights, "--data", data, "--out", str(out), "--image-size", "32",
            "--sheet-rows", "2", "--refine", "guided", "--normalize", "none"]
    assert evaluate_job.main(argv) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["checkpoint"] == random_weights and doc["counts"]["images"] == 3
    assert set(doc["metrics"]) == set(METRIC_KEYS) == set(doc["plain_metrics"]) and doc["refine"] == "guided"
    assert doc["metrics"] != doc["plain_metrics"]
    differ = []
    for mask in sorted(Path(data, "DUTS-TE/DUTS-TE-Mask").glob("*.png")):
        guided, plain = _load(out / "predictions" / mask.name), _load(out / "predictions-plain" / mask.name)
        assert guided.shape == plain.shape == _load(mask).shape  # original size
        differ.append(not np.array_equal(guided, plain))
    assert any(differ)
    with Image.open(out / "best.png") as img:
        assert img.size == sheet_size(2)
    # each image's quality figures, as the masking's manifest gave them, and how they rank the errors
    per_image = pd.read_parquet(out / "per_image.parquet")
    manifest = pd.concat(pd.read_parquet(p) for p in (out / "predictions" / "_manifest").glob("*.parquet"))
    merged = per_image.merge(manifest, left_on="pred", right_on="output", suffixes=("", "_manifest"))
    assert len(merged) == 3
    for key in QUALITY_COLUMNS:
        assert list(merged[key]) == list(merged[f"{key}_manifest"]), key
    assert list(per_image["gt_empty"]) == [False, True, False]  # every 2nd held-out scene has no object
    # the confidence ranks the masks as written: under --normalize none not the protocol's stretched MAE
    for row in per_image.itertuples():
        pred, gt = _load(row.pred), _load(row.gt)
        assert row.mae_as_written == pytest.approx(np.abs(pred / 255 - (gt > 128)).mean())
    assert (per_image["mae_as_written"] - per_image["mae"]).abs().max() > 0.05
    report = doc["confidence"]
    assert doc["normalize"] == "none" and report["images"] == 3 and report["empty_scenes"] == 1
    assert report["spearman_confidence_mae"] == pytest.approx(spearmanr(per_image["confidence"],
                                                                        per_image["mae_as_written"]).statistic)
    assert report["no_object"] == int(per_image["no_object"].sum())
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert any(line.startswith("confidence against per-image MAE over 3 images: Spearman ") for line in lines)
    assert lines[-3].startswith("| refine guided | ") and lines[-2].startswith("| refine none (plain) | ")
    assert lines[-1].startswith("| BASNet, paper (DUTS-TE) |")


@pytest.mark.ray
def test_evaluate_checkpoint_scores_the_sample_held_out_images_and_ends_with_the_table_and_the_pictures(
        ray_session, random_weights, tmp_path, capsys):
    from basnet.data.discovery import evaluation_pairs
    from basnet.data.sample import ensure_sample
    from basnet.evaluate.ray_scoring import evaluate_checkpoint

    cfg = TrainConfig(image_size=32, crop_size=32, eval_data="sample", storage=str(tmp_path / "runs"),
                      name="demo").resolved()
    evaluation = evaluate_checkpoint(random_weights, cfg)
    held_out = evaluation_pairs(ensure_sample())
    assert sorted(p.gt for p in evaluation.matching.pairs) == sorted(p.mask for p in held_out)
    out = tmp_path / "runs" / "demo" / "eval"  # the default <storage>/<name>/eval
    assert json.loads((out / "metrics.json").read_text())["counts"]["images"] == len(held_out)
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-6].startswith("| | maxF | relaxFb | MAE |")
    assert lines[-3].startswith("| BASNet, paper (DUTS-TE) | 0.860 | 0.758 | 0.047 |")
    assert lines[-2:] == ["", f"pictures: {tmp_path}/runs/demo/curves.png  {out}/worst.png  {out}/best.png"]
    assert (out / "worst.png").exists() and (out / "best.png").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to evaluate"),
    (["--pred", "x"], "--pred and --gt go together: add --gt"),
    (["--weights", "w.pth"], "--weights and --data go together: add --data"),
    (["--pred", "x", "--gt", "y", "--data", "z"], "two different modes"),
    (["--pred", "/no/such/preds", "--gt", "/no/such/gt"], "--pred /no/such/preds does not exist"),
    (["--weights", "/no/such.pth", "--data", "sample"], "checkpoint not found: /no/such.pth"),
    (["--pred", "x", "--gt", "y", "--sheet-rows", "0"], "--sheet-rows must be positive"),
    (["--pred", "x", "--gt", "y", "--refine", "guided"], "--refine is for --weights"),
    (["--pred", "x", "--gt", "y", "--normalize", "none"], "--normalize is for --weights"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert evaluate_job.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_job_process_exits_2_on_a_missing_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs/evaluate.py"), "--pred", str(tmp_path / "none"),
                           "--gt", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --pred {tmp_path / 'none'} does not exist; check the path"
