"""Bulk masking's library pieces without Ray: names, inputs, the three stages, the manifest."""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from basnet import storage
from basnet.errors import ConfigError, JobFailed, UsageError
from basnet.imaging import decode_image, render_output
from basnet.imaging.render import EXACT_MAX_PIXELS
from basnet.infer.config import InferConfig
from basnet.infer.inputs import InputSpec, discover_units, image_units, read_manifest, resolve_input
from basnet.infer.listing import assign_outputs, list_batch, unit_rows
from basnet.infer.manifest import STAGES, InferSummary, ManifestWriter
from basnet.infer.monitor import RunMonitor, is_systemic
from basnet.infer.naming import OutputNames, UnsafeNameError, safe_parts
from basnet.infer.predictor import MaskPredictor
from basnet.infer.stages import decode_batch, write_batch
from basnet.model import BASNet
from basnet.predict import predict_raw
from basnet.quality import QUALITY_COLUMNS, assess
from basnet.transforms import resize_image, resize_mask

from infer_collection import MAX_PIXELS, add_member, bad_files, encode, picture, valid_files, write_shard


def strings(*values) -> np.ndarray:
    """A string (or bytes) column as Ray Data hands it to a numpy-format UDF."""
    return np.array(values, dtype=object)


def decode_items(items: list[tuple[str, str, str]], *, size: int = 32, keep_bytes: bool = False,
                 overwrite: bool = False, batch_size: int = 64) -> list[dict]:
    """Runs stage 1 on listed (kind, source, output) items; returns the rows as dicts."""
    batch = {k: np.array(v, dtype=object) for k, v in zip(("kind", "source", "output"), zip(*items))}
    n = len(items)
    batch.update(input=batch["source"], status=strings(*["pending"] * n), error=strings(*[""] * n),
                 list_s=np.zeros(n))
    rows = []
    for out in decode_batch(batch, size=size, max_pixels=MAX_PIXELS, keep_bytes=keep_bytes,
                            overwrite=overwrite, batch_size=batch_size):
        rows += [{k: v[i] for k, v in out.items()} for i in range(len(out["status"]))]
    return rows


@pytest.mark.parametrize("name", ["../../x.jpg", "a/../../b.jpg", "a\\..\\..\\x.jpg", "..", "/", ""])
def test_safe_parts_refuses_names_that_leave_the_folder(name):
    with pytest.raises(UnsafeNameError):
        safe_parts(name)


def test_safe_parts_drops_absolute_and_dot_parts_and_replaces_control_characters():
    assert safe_parts("/abs/./y.jpg") == ["abs", "y.jpg"]
    assert safe_parts("a//b\\c.jpg") == ["a", "b", "c.jpg"]
    assert safe_parts("odd\x01name\x7f?.jpg") == ["odd_name_?.jpg"]
    assert safe_parts("bad\udcffbyte.jpg") == ["bad_byte.jpg"]


def test_output_names_keep_folders_and_give_colliding_stems_their_full_name():
    names = OutputNames()
    claimed = [names.claim(n) for n in ("a/x.jpg", "b/x.jpg", "a/x.png", "a/x.jpg.png", "c/.hidden", "d/noext")]
    assert claimed == ["a/x.png", "b/x.png", "a/x.png.png", "a/x.jpg.png", "c/.hidden.png", "d/noext.png"]
    with pytest.raises(UnsafeNameError, match="taken"):
        names.claim("a/x.png")


def test_assign_outputs_mirrors_paths_skips_existing_and_maps_shards_to_folders(tmp_path):
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    (tmp_path / "out/b").mkdir(parents=True)
    (tmp_path / "out/b/x.png").write_bytes(b"done")
    sources = [f"{root}/a/x.jpg", f"{root}/b/x.JPG", f"{root}/s/shard-1.tar", "/elsewhere/y.jpg"]
    rows = assign_outputs(sources, root, out, overwrite=False)
    assert [(r["kind"], r["status"], r["output"]) for r in rows] == [
        ("image", "pending", f"{out}/a/x.png"), ("", "skipped", f"{out}/b/x.png"),
        ("tar", "pending", f"{out}/s/shard-1"), ("", "failed", "")]
    assert "not under the root" in rows[3]["error"]
    assert [r["status"] for r in assign_outputs(sources[:2], root, out, overwrite=True)] == ["pending"] * 2


def test_read_manifest_resolves_relative_entries_and_ignores_comments(tmp_path):
    (tmp_path / "list.txt").write_text("# photos\na/x.jpg\n\n/abs/y.jpg\na/x.jpg\ns3://b/k/z.png\n")
    assert read_manifest(str(tmp_path / "list.txt")) == [str(tmp_path / "a/x.jpg"), "/abs/y.jpg", "s3://b/k/z.png"]


def test_read_manifest_takes_the_path_column_of_a_parquet_file(tmp_path):
    pq.write_table(pa.table({"id": [1, 2], "path": ["a/x.jpg", "b/y.jpg"], "label": ["p", "q"]}),
                   str(tmp_path / "m.parquet"))
    assert read_manifest(str(tmp_path / "m.parquet")) == [str(tmp_path / "a/x.jpg"), str(tmp_path / "b/y.jpg")]
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), str(tmp_path / "n.parquet"))
    with pytest.raises(UsageError, match="'path' column"):
        read_manifest(str(tmp_path / "n.parquet"))


def listed(unit: dict, root: str, output_root: str, *, root_given: bool = True,
           overwrite: bool = False) -> list[dict]:
    return [row for rows in unit_rows(unit, root=root, root_given=root_given, output_root=output_root,
                                      overwrite=overwrite) for row in rows]


def folder_rows(spec: InputSpec, output_root: str) -> list[dict]:
    """Every row of a folder input, unit by unit, as the job's listing tasks find them."""
    return [row for unit in discover_units(spec, output_root) for row in listed(unit, spec.root, output_root)]


def test_folder_listing_is_case_insensitive_and_leaves_out_the_output_folder(tmp_path):
    for rel in ("a/X.JPG", "b/y.Png", "c/s.tar", "notes.txt", "masks/a/X.png", ".hidden.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    cfg = InferConfig(input=str(tmp_path), output=str(tmp_path / "masks"), weights="w")
    spec = resolve_input(cfg)
    assert (spec.kind, spec.root) == ("folder", str(tmp_path))
    rows = folder_rows(spec, str(tmp_path / "masks"))
    inputs = [r for r in rows if r["status"] != "not_image"]
    assert sorted(os.path.relpath(r["source"], tmp_path) for r in inputs) == ["a/X.JPG", "b/y.Png", "c/s.tar"]
    assert {r["output"] for r in inputs} == {str(tmp_path / "masks/a/X.png"), str(tmp_path / "masks/b/y.png"),
                                            str(tmp_path / "masks/c/s")}
    # a file that is no image is a row of its own, counted by the job and never masked
    assert [(os.path.relpath(r["source"], tmp_path), r["kind"]) for r in rows if r not in inputs] == [("notes.txt", "")]


def test_folder_units_split_the_tree_and_give_the_same_rows_as_one_walk(tmp_path):
    """Units never split a folder, so the collision rule (first in sorted order keeps x.png) and the
    skip-existing rule give the same rows however the tree is split."""
    for top in range(3):
        for sub in range(12):
            for name in ("x.jpg", "x.png", "y.webp"):
                (tmp_path / f"in/t{top}/s{sub}").mkdir(parents=True, exist_ok=True)
                (tmp_path / f"in/t{top}/s{sub}/{name}").write_bytes(b"x")
    (tmp_path / "in/root.jpg").write_bytes(b"x")
    (tmp_path / "out/t1/s3").mkdir(parents=True)
    (tmp_path / "out/t1/s3/x.png").write_bytes(b"done")
    root, out = str(tmp_path / "in"), str(tmp_path / "out")
    units = discover_units(InputSpec("folder", root, root), out)
    assert len(units) >= 32 and sum(u["recursive"] for u in units) >= 30
    split = sorted((r["source"], r["output"], r["status"]) for u in units for r in listed(u, root, out))
    whole = sorted((r["source"], r["output"], r["status"]) for r in listed(
        {"kind": "folder", "uri": root, "recursive": True, "uris": []}, root, out))
    assert split == whole and len(split) == 3 * 12 * 3 + 1
    by_source = {os.path.relpath(s, root): (os.path.relpath(o, out), st) for s, o, st in split}
    assert by_source["t0/s0/x.jpg"] == ("t0/s0/x.png", "pending")
    assert by_source["t0/s0/x.png"] == ("t0/s0/x.png.png", "pending")
    assert by_source["t1/s3/x.jpg"] == ("t1/s3/x.png", "skipped")


def test_explicit_image_lists_become_units_of_whole_folders(tmp_path):
    images = [f"/data/f{i // 600}/img{i}.jpg" for i in range(2400)]
    units = image_units(images + images[:5])
    assert sum(len(u["uris"]) for u in units) == 2400
    assert all(len({os.path.dirname(x) for x in u["uris"]} & {os.path.dirname(x) for x in v["uris"]}) == 0
               for u in units for v in units if u is not v)


def test_list_batch_records_a_folder_that_cannot_be_listed_as_one_failed_row(tmp_path, monkeypatch):
    def refuse(uri):
        raise PermissionError(13, "Permission denied", uri)

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(storage, "list_folder", refuse)  # what a listing refused by the OS or S3 raises
    batch = {"kind": strings("folder"), "uri": strings(str(tmp_path / "locked")), "recursive": np.array([True]),
             "uris": strings([])}
    out = list(list_batch(batch, root=str(tmp_path), root_given=True, output_root=str(tmp_path / "o"),
                          overwrite=False))
    assert len(out) == 1 and list(out[0]["status"]) == ["failed"]
    assert out[0]["error"][0].startswith("cannot list: ") and "Permission denied" in out[0]["error"][0]
    assert out[0]["input"][0] == str(tmp_path / "locked")


def test_resolve_input_reports_a_missing_input_as_a_usage_error(tmp_path):
    cfg = InferConfig(input=str(tmp_path / "nope"), output=str(tmp_path / "o"), weights="w")
    with pytest.raises(UsageError, match="input not found"):
        resolve_input(cfg)


def test_manifest_root_is_the_entries_common_folder_when_the_manifest_lies_elsewhere(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists/l.txt").write_text(f"{tmp_path}/photos/a/x.jpg\n{tmp_path}/photos/b/y.jpg\n")
    cfg = InferConfig(input=str(tmp_path / "lists/l.txt"), output=str(tmp_path / "o"), weights="w")
    spec = resolve_input(cfg)
    rows = listed(discover_units(spec, str(tmp_path / "o"))[0], spec.root, str(tmp_path / "o"), root_given=False)
    assert [r["output"] for r in rows] == [str(tmp_path / "o/a/x.png"), str(tmp_path / "o/b/y.png")]


def test_decode_batch_keeps_original_size_and_records_every_bad_input_as_failed(tmp_path):
    items = []
    for rel, data in {**{k: d for k, (d, _) in valid_files().items()}, **bad_files()}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
        items.append(("image", str(tmp_path / rel), f"/out/{rel}.png"))
    items.append(("image", str(tmp_path / "missing.jpg"), "/out/missing.png"))
    rows = {os.path.relpath(r["input"], tmp_path): r for r in decode_items(items, batch_size=4)}
    for rel, (_, size) in valid_files().items():
        assert rows[rel]["status"] == "pending" and (rows[rel]["height"], rows[rel]["width"]) == size
        assert len(rows[rel]["image"]) == 32 * 32 * 3 and rows[rel]["read_s"] > 0 and rows[rel]["decode_s"] > 0
    errors = {rel: rows[rel]["error"] for rel in (*bad_files(), "missing.jpg")}
    assert all(rows[rel]["status"] == "failed" for rel in errors)
    assert "empty" in errors["bad/empty.jpg"] and "truncated" in errors["bad/truncated.jpg"].lower()
    assert "not a recognised image" in errors["bad/text.png"] and "max-pixels" in errors["bad/huge.png"]
    assert "cannot read" in errors["missing.jpg"]


def test_decode_batch_walks_a_tar_shard_and_refuses_hostile_members(tmp_path):
    write_shard(str(tmp_path / "s.tar"))
    out = str(tmp_path / "out" / "s")
    rows = {r["input"].split("#", 1)[1]: r for r in decode_items([("tar", str(tmp_path / "s.tar"), out)])}
    assert set(rows) == {"img/p.jpg", "img/q.png", "../../x.jpg", "/abs/y.jpg", "odd\x01name?.jpg", "link.jpg"}
    assert rows["../../x.jpg"]["status"] == "failed" and "unsafe" in rows["../../x.jpg"]["error"]
    assert rows["link.jpg"]["status"] == "failed" and "not a regular file" in rows["link.jpg"]["error"]
    assert rows["/abs/y.jpg"]["output"] == f"{out}/abs/y.png"
    assert rows["odd\x01name?.jpg"]["output"] == f"{out}/odd_name?.png"
    assert all(r["output"].startswith(out + "/") for r in rows.values() if r["output"])


def test_decode_batch_records_a_truncated_shard_and_keeps_its_readable_members(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(3):
            add_member(tar, f"m{i}.png", encode(Image.fromarray(picture(40, 40, i)), "PNG"))
    second = tarfile.open(fileobj=io.BytesIO(buffer.getvalue())).getmembers()[1]
    (tmp_path / "t.tar").write_bytes(buffer.getvalue()[: second.offset_data + 100])  # cut inside it
    rows = decode_items([("tar", str(tmp_path / "t.tar"), str(tmp_path / "o"))])
    assert rows[0]["status"] == "pending"
    assert rows[-1]["status"] == "failed" and "unreadable tar shard" in rows[-1]["error"]


def test_decode_batch_skips_shard_members_whose_mask_exists(tmp_path):
    write_shard(str(tmp_path / "s.tar"))
    out = tmp_path / "o"
    (out / "img").mkdir(parents=True)
    (out / "img/p.png").write_bytes(b"done")
    decoded = decode_items([("tar", str(tmp_path / "s.tar"), str(out))])
    rows = {r["input"].split("#", 1)[1]: r["status"] for r in decoded}
    assert rows["img/p.jpg"] == "skipped" and rows["img/q.png"] == "pending"


def test_render_output_gives_each_format_at_the_original_size():
    prob = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    source = encode(Image.fromarray(picture(40, 50, 0)), "PNG")
    mask = np.asarray(Image.open(io.BytesIO(render_output(prob, 40, 50, fmt="mask"))))
    binary = np.asarray(Image.open(io.BytesIO(render_output(prob, 40, 50, fmt="binary", threshold=0.5))))
    rgba = Image.open(io.BytesIO(render_output(prob, 40, 50, fmt="rgba", source=source)))
    assert mask.shape == binary.shape == (40, 50) and rgba.size == (50, 40) and rgba.mode == "RGBA"
    assert mask.min() == 0 and mask.max() == 255 and len(np.unique(mask)) > 100
    assert set(np.unique(binary)) == {0, 255}
    assert np.array_equal(binary == 255, mask >= 128)
    assert np.array_equal(np.asarray(rgba)[..., 3], mask)
    assert np.array_equal(np.asarray(rgba)[..., :3], decode_image(source))


def test_render_is_the_float_protocol_up_to_benchmark_sizes_and_within_one_grey_level_above():
    prob = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    for height, width in ((40, 50), (600, 900)):  # 0.5 MP is EXACT_MAX_PIXELS: below it, and above it
        assert (height * width <= EXACT_MAX_PIXELS) == (height == 40)
        full = resize_mask(prob, (height, width))
        mask = np.asarray(Image.open(io.BytesIO(render_output(prob, height, width, fmt="mask"))), np.int16)
        binary = np.asarray(Image.open(io.BytesIO(render_output(prob, height, width, fmt="binary"))))
        exact = np.clip(np.rint(full * 255.0), 0, 255)
        if height == 40:
            assert np.array_equal(mask, exact) and np.array_equal(binary == 255, full >= 0.5)
        else:
            assert np.abs(mask - exact).max() == 1  # the 8-bit path: off by one at most, and somewhere
            assert np.array_equal(binary == 255, mask >= 128)


def stage_columns(n: int) -> dict[str, np.ndarray]:
    return {stage: np.zeros(n) for stage in STAGES}


def test_mask_predictor_gives_the_models_raw_maps_and_passes_failed_rows_through():
    torch.manual_seed(0)
    model = BASNet().eval()
    images = np.stack([resize_image(picture(40, 40, s), 32) for s in range(3)])
    batch = {"input": strings("a", "b", "c"), "status": strings("pending", "failed", "pending"),
             "error": strings("", "bad", ""), **stage_columns(3),
             "image": strings(images[0].tobytes(), b"", images[2].tobytes())}
    out = MaskPredictor(model.state_dict(), device=torch.device("cpu"), image_size=32)(batch)
    direct = predict_raw(model, torch.from_numpy(images[[0, 2]]), device=torch.device("cpu")).numpy()
    probs = [np.frombuffer(p, np.float32).reshape(32, 32) if p else None for p in out["prob"]]
    assert "image" not in out and out["prob"][1] == b"" and not set(QUALITY_COLUMNS) & set(out)  # judged when written
    raw = np.stack([probs[0], probs[2]])
    assert np.allclose(raw, direct, atol=1e-5)  # the sigmoid as it is: normalised only when written
    assert list(out["status"]) == ["pending", "failed", "pending"]
    assert out["infer_s"][1] == 0 and out["infer_s"][0] > 0


def test_write_batch_writes_pending_rows_with_their_masks_figures_and_records_write_failures(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    prob = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    batch = {"input": strings("a", "b", "c"),
             "output": strings(str(tmp_path / "o/a.png"), str(tmp_path / "file/b.png"), str(tmp_path / "o/c.png")),
             "width": np.array([20, 20, 0]), "height": np.array([10, 10, 0]),
             "status": strings("pending", "pending", "failed"), "error": strings("", "", "bad"),
             **stage_columns(3), "data": strings(b"", b"", b""), "prob": strings(*(p.tobytes() for p in prob))}
    out = write_batch(batch, fmt="mask", threshold=0.5, size=32, normalize="none")
    assert list(out["status"]) == ["written", "failed", "failed"] and "cannot write" in out["error"][1]
    figures = assess(prob[:1], normalize="none")  # the written mask's figures, as the options make it
    for key in QUALITY_COLUMNS:
        assert out[key][0] == figures[key][0], key
    assert np.isnan(out["confidence"][2]) and not out["no_object"][2]
    with Image.open(tmp_path / "o/a.png") as written:
        assert written.size == (20, 10) and not (tmp_path / "o/c.png").exists()
    assert set(out) == {"input", "output", "width", "height", "status", "error", *STAGES, *QUALITY_COLUMNS}
    assert out["encode_s"][0] > 0 and out["write_s"][0] > 0 and out["encode_s"][2] == 0


def test_manifest_writer_flushes_numbered_parts_and_counts_statuses(tmp_path):
    writer = ManifestWriter(str(tmp_path), "run1", rows_per_part=2)
    rows = {"input": ["a", "b", "c"], "output": ["A", "", ""], "width": [3, 0, 0], "height": [4, 0, 0],
            "status": ["written", "failed", "skipped"], "error": ["", "boom", ""],
            **{stage: [0.1, 0.0, 0.0] for stage in STAGES}}
    writer.add({k: v[:2] for k, v in rows.items()})  # reaches rows_per_part: flushed
    writer.add({k: v[2:] for k, v in rows.items()})
    parts = writer.close()
    assert [os.path.basename(p) for p in parts] == ["part-run1-0000.parquet", "part-run1-0001.parquet"]
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    assert table.column("width").to_pylist() == [3, None, None]
    assert table.column("error").to_pylist() == [None, "boom", None]
    assert table.column("output").to_pylist() == ["A", None, None]
    assert writer.counts == {"written": 1, "skipped": 1, "failed": 1}
    assert table.column("run_id").to_pylist() == ["run1"] * 3
    assert table.column("seconds").to_pylist() == pytest.approx([0.1 * len(STAGES), 0.0, 0.0])
    assert writer.stage_seconds == pytest.approx(dict.fromkeys(STAGES, 0.1)) and writer.rows == 3


@pytest.mark.parametrize("change, message", [
    ({"input": None}, "--input is required"), ({"image_size": 48}, "multiple of 32"),
    ({"format": "jpeg"}, "--format"), ({"threshold": 2.0}, "--threshold"), ({"refine": "matting"}, "--refine"),
    ({"batch_size": 0}, "--batch-size"), ({"actor_resources": "{infer_node: 1}"}, "not JSON"),
    ({"task_resources": '{"x": -1}'}, "positive numbers"),
])
def test_config_check_names_the_bad_option(change, message):
    cfg = InferConfig(**{"input": "i", "output": "o", "weights": "w", **change})
    with pytest.raises(ConfigError, match=message):
        cfg.check()


def test_config_parses_resources_json():
    cfg = InferConfig(input="i", output="o", weights="w", actor_resources='{"infer_node": 1}')
    assert cfg.resources("actor_resources") == {"infer_node": 1.0} and cfg.resources("task_resources") == {}


def test_summary_line_adds_up_and_reports_throughput():
    summary = InferSummary(written=7, skipped=2, failed=1, seconds=4.0, output="o", manifest=[], config="c", run_id="r")
    assert summary.total == 10
    assert summary.line() == "written 7, skipped 2, failed 1 of 10 in 4.0 s (2.00 images/s)"


def test_refine_defaults_to_guided_for_cutouts_only_and_guided_masks_carry_the_image_bytes():
    def cfg(**options):
        return InferConfig(input="i", output="o", weights="w", **options)

    assert [cfg(format=f).resolved_refine() for f in ("mask", "binary", "rgba")] == ["none", "none", "guided"]
    assert cfg(format="rgba", refine="none").resolved_refine() == "none"
    assert [cfg(**o).needs_source() for o in ({}, {"refine": "guided"}, {"format": "rgba", "refine": "none"})] == [
        False, True, True]


def test_infer_help_documents_the_gpu_options():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "jobs/infer.py", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    for flag in ("--precision", "--channels-last", "--compile", "--batch-size", "--task-batch-size", "--verbose"):
        assert flag in proc.stdout
    with pytest.raises(ConfigError, match="--task-batch-size must be positive"):
        InferConfig(input="x", output="y", weights="w", task_batch_size=0).check()


def test_predictor_runs_bf16_and_channels_last_on_cpu_within_one_grey_level_of_fp32():
    torch.manual_seed(0)
    state = BASNet().eval().state_dict()
    images = np.stack([resize_image(picture(40, 48, seed=i), 32) for i in range(3)])
    batch = {"image": strings(*(i.tobytes() for i in images)), "status": strings(*["pending"] * 3),
             "error": strings("", "", ""), **stage_columns(3)}

    def predict(**options) -> np.ndarray:
        out = MaskPredictor(state, device=torch.device("cpu"), image_size=32, **options)(batch)["prob"]
        return np.stack([np.frombuffer(p, np.float32) for p in out])

    reference = predict()
    for options in ({"precision": "bf16"}, {"channels_last": True}):
        prob = predict(**options)
        assert np.abs(np.rint(prob * 255) - np.rint(reference * 255)).mean() < 1.0, options


def monitor_batch(*rows: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    return strings(*(s for s, _ in rows)), strings(*(e for _, e in rows))


def test_run_monitor_stops_at_ten_refused_reads_in_a_row_but_not_at_bad_images():
    monitor = RunMonitor(max_failed_fraction=1.0)
    denied = ("failed", "cannot read: AWS Error ACCESS_DENIED during GetObject operation: Access Denied")
    monitor.add(*monitor_batch(*[("failed", "cannot decode: truncated")] * 50))  # bad images: go on
    monitor.add(*monitor_batch(*[denied] * 9, ("written", ""), *[denied] * 9))  # a success breaks the run
    with pytest.raises(JobFailed, match="stopped early: 10 reads in a row were refused .*Access Denied"):
        monitor.add(*monitor_batch(denied))
    assert not is_systemic("cannot read: [Errno 2] No such file or directory: 'x.jpg'")
    assert is_systemic("cannot list: AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation: NoSuchBucket")


def test_run_monitor_checks_the_failed_share_from_100_tried_and_at_the_end_counting_skipped_inputs_as_done():
    monitor = RunMonitor(max_failed_fraction=0.5)
    monitor.add(*monitor_batch(*[("failed", "cannot decode: x")] * 60))
    monitor.add(*monitor_batch(*[("written", "")] * 39))  # 60 of 99 tried: not checked yet
    with pytest.raises(JobFailed, match=r"stopped early: 60 of 100 inputs failed \(60%\), above "
                                        r"--max-failed-fraction 0.5 \(first error: cannot decode: x\)"):
        monitor.add(*monitor_batch(("written", "")))
    rerun = RunMonitor(max_failed_fraction=0.5)  # the same failures in a collection mostly done before
    rerun.add(*monitor_batch(*[("skipped", "")] * 500, *[("failed", "cannot decode: x")] * 60))
    rerun.add(*monitor_batch(*[("written", "")] * 40))
    rerun.finish()  # 60 of 600: the collection's share, not this run's
    small = RunMonitor(max_failed_fraction=0.5)
    small.add(*monitor_batch(*[("failed", "e")] * 3, *[("written", "")] * 1, ("skipped", "")))
    with pytest.raises(JobFailed, match=r"^3 of 5 inputs failed \(1 done before\)"):
        small.finish()
    done_before = RunMonitor(max_failed_fraction=0.5)  # a re-run: nothing left to write, the bad file fails again
    done_before.add(*monitor_batch(("failed", "e"), ("skipped", ""), ("skipped", "")))
    done_before.finish()
    nothing = RunMonitor(max_failed_fraction=1.0)
    nothing.add(*monitor_batch(("failed", "e"), ("failed", "e")))
    with pytest.raises(JobFailed, match="wrote no mask: all 2 inputs tried failed"):
        nothing.finish()
    assert nothing.counts == {"written": 0, "skipped": 0, "failed": 2}


def test_auto_executor_runs_here_without_a_cluster_a_ray_option_or_a_gpu_for_torch(monkeypatch):
    from basnet.infer import local

    monkeypatch.setitem(sys.modules, "ray", None)  # this process is on no Ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(local, "_gpu_devices", lambda: [])
    cfg = InferConfig(input="in", output="out", weights="w.pth")
    assert local.runs_here(cfg)
    assert not local.runs_here(dataclasses.replace(cfg, executor="ray"))
    assert not local.runs_here(dataclasses.replace(cfg, actors=2))
    assert not local.runs_here(dataclasses.replace(cfg, address="10.0.0.1:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not local.runs_here(cfg) and local.runs_here(dataclasses.replace(cfg, executor="local"))
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(local, "_gpu_devices", lambda: ["/dev/nvidia0"])
    assert not local.runs_here(cfg)  # the torch runtime feeds a GPU from Ray's CPU tasks
    assert local.runs_here(dataclasses.replace(cfg, weights="model.onnx"))  # ONNX Runtime runs on CPUs only
