"""Bad inputs, --on-error, --resume and --overwrite: no row lost or written twice, foreign files untouched."""

import io
import os

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import assert_same_floats, assert_same_rows, faces_folder, read_csv, run

from vitnt_jax import output

from helpers import smooth_faces


def _png(face) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def folder(tmp_path):
    return faces_folder(tmp_path / "faces")


def _bad_folder(root):
    root.mkdir()
    faces = smooth_faces(6, seed=8)
    Image.fromarray(faces[0]).save(root / "a_good.png")
    buffer = io.BytesIO()
    Image.fromarray(faces[1]).save(buffer, format="JPEG")
    (root / "b_truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (root / "c_empty.png").write_bytes(b"")
    (root / "d_text.png").write_text("no pixels here")
    Image.fromarray(faces[2]).convert("CMYK").save(root / "e_cmyk.jpg")
    Image.fromarray(faces[3][..., 0].astype(np.uint16) * 257).save(root / "f_16bit.png")
    Image.fromarray(faces[4]).resize((45, 37)).save(root / "g_odd_size.png")
    Image.fromarray(faces[5]).convert("P").save(root / "h_palette.png")
    return root


def test_bad_inputs_keep_their_rows(tiny_checkpoint, tmp_path, capsys):
    root = _bad_folder(tmp_path / "mixed")
    out, emb, pq = tmp_path / "s.csv", tmp_path / "e.npy", tmp_path / "pq.npy"
    argv = ["--images", str(root), "--out", str(out), "--batch-size", "3"]
    assert run(tiny_checkpoint, *argv, "--save-embeddings", str(emb), "--save-patch-quality", str(pq)) == 0
    rows = read_csv(out)
    assert rows[0] == ["id", "quality", "error"]
    by_id = {r[0]: r for r in rows[1:]}
    assert sorted(by_id) == sorted(p.name for p in root.iterdir()) and len(rows) == 9
    bad = {"b_truncated.jpg", "c_empty.png", "d_text.png"}
    for name, row in by_id.items():
        assert (row[1] == "") == (name in bad) and bool(row[2]) == (name in bad), row
    err = capsys.readouterr().err
    assert "scored 5, failed 3" in err and err.count("warning:") == 1
    embeddings, maps = np.load(emb), np.load(pq)
    assert embeddings.shape == (8, 8) and maps.shape == (8, 4, 4)
    failed = np.asarray([r[0] in bad for r in rows[1:]])
    assert np.isnan(embeddings[failed]).all() and np.isfinite(embeddings[~failed]).all()
    assert np.isnan(maps[failed]).all() and ((maps[~failed] > 0) & (maps[~failed] <= 1)).all()


def test_on_error_fail_then_resume(tiny_checkpoint, folder, tmp_path, capsys):
    reference, emb_ref = tmp_path / "ref.csv", tmp_path / "ref.npy"
    argv = ["--images", str(folder), "--out", str(reference), "--batch-size", "2", "--save-embeddings", str(emb_ref)]
    assert run(tiny_checkpoint, *argv) == 0
    good = (folder / "10.png").read_bytes()
    (folder / "10.png").write_bytes(b"broken")
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    argv = ["--images", str(folder), "--out", str(out), "--batch-size", "8", "--save-embeddings", str(emb)]
    assert run(tiny_checkpoint, *argv, "--on-error", "fail") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 10.png: not a readable image (no PNG, JPEG or WEBP data) (--on-error fail)")
    assert "--resume" in err
    assert read_csv(out) == read_csv(reference)[:11]  # header + every row before the bad input, same batches
    assert not emb.exists() and (tmp_path / "e.npy.partial").exists()
    assert run(tiny_checkpoint, *argv) == 1  # exists: refuses without --resume or --overwrite
    (folder / "10.png").write_bytes(good)
    assert run(tiny_checkpoint, *argv, "--resume") == 0
    assert "skipping 10 already written" in capsys.readouterr().err
    # The resumed rows were scored at other batch positions than in the reference run.
    assert_same_rows(read_csv(out), read_csv(reference))
    np.testing.assert_allclose(np.load(emb), np.load(emb_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(emb)[:10], np.load(emb_ref)[:10])  # the rows kept are the rows written
    assert not (tmp_path / "e.npy.partial").exists()
    before, before_emb = out.read_bytes(), np.load(emb)
    assert run(tiny_checkpoint, *argv, "--resume") == 0  # nothing left to do, nothing changes
    assert out.read_bytes() == before
    np.testing.assert_array_equal(np.load(emb), before_emb)


def test_resume_after_a_crash_mid_row(tiny_checkpoint, folder, tmp_path):
    reference = tmp_path / "ref.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(reference)) == 0
    out = tmp_path / "s.csv"
    text = reference.read_text()
    cut = text.index("05.png") + 8  # a crash left half of row 05 behind
    out.write_text(text[:cut])
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--resume") == 0
    got = out.read_text()
    assert got.startswith(text[: text.index("05.png")])  # the complete rows are kept byte for byte
    # Rows 05.. were scored again at other batch positions: ids and errors exact, qualities to the ulp.
    assert_same_rows(read_csv(out), read_csv(reference))


def test_resume_never_changes_a_foreign_file(tiny_checkpoint, folder, tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 10 + b"no newline at the end")
    text = tmp_path / "notes.csv"
    text.write_text("name,age\nada,36\nalan,41")
    for path in (binary, text):
        before = path.read_bytes()
        assert run(tiny_checkpoint, "--images", str(folder), "--out", str(path), "--resume") == 1
        assert path.read_bytes() == before
        assert "choose a new --out" in capsys.readouterr().err


def test_reference_resume_refuses_a_csv(tiny_checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out)) == 0
    before = out.read_bytes()
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--format", "reference", "--resume") == 1
    assert "is a CSV, not a reference-format file; choose a new --out" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_resume_of_an_empty_or_headerless_file_starts_afresh(tiny_checkpoint, folder, tmp_path):
    reference = tmp_path / "ref.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(reference)) == 0
    for content in (b"", b"id,qual"):
        out = tmp_path / "s.csv"
        out.write_bytes(content)
        assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--resume") == 0
        assert out.read_bytes() == reference.read_bytes()  # the same batches as the reference: the same bytes


def test_existing_results_are_never_replaced_without_overwrite(tiny_checkpoint, folder, tmp_path, capsys):
    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out)) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out)) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err == f"error: {out} already exists; pass --resume to continue it, --overwrite to replace it, or choose "
        "another --out."
    )
    assert out.read_bytes() == before
    emb.write_bytes(b"taken")
    assert (
        run(tiny_checkpoint, "--images", str(folder), "--out", str(tmp_path / "t.csv"), "--save-embeddings", str(emb))
        == 1
    )
    assert "pass --overwrite or --resume" in capsys.readouterr().err and emb.read_bytes() == b"taken"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--overwrite", "--batch-size", "4") == 0
    assert_same_floats(
        [float(r[1]) for r in read_csv(out)[1:]], [float(line.split(b",")[1]) for line in before.splitlines()[1:]]
    )


def test_reference_resume_keeps_ids_that_end_in_spaces(tiny_checkpoint, folder, tmp_path):
    # '<id> <score>' splits at the last space only: an id ending in a space (or a tab) is read back as written,
    # so a resumed run sees its row as done and never writes it twice.
    names = sorted(p.name for p in folder.iterdir())[:3]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([f"{folder / names[0]}", f"{folder / names[1]} ", f"{folder / names[2]}\t"]))
    out = tmp_path / "s.txt"
    argv = ["--list", str(listing), "--out", str(out), "--format", "reference"]
    assert run(tiny_checkpoint, *argv) == 0
    first = out.read_text()
    assert len(first.splitlines()) == 3
    assert run(tiny_checkpoint, *argv, "--resume") == 0
    assert out.read_text() == first


def test_an_existing_result_is_refused_before_the_model_loads(tiny_checkpoint, folder, tmp_path, capsys, monkeypatch):
    # Resolving a named model can mean a download and a conversion: an existing result is refused first.
    from vitnt_jax import pipeline

    out, crops, emb = tmp_path / "s.csv", tmp_path / "crops", tmp_path / "e.npy"
    out.write_text("id,quality,error\n")
    crops.mkdir()
    (crops / "00000000_x.png").write_bytes(b"")
    emb.write_bytes(b"taken")
    monkeypatch.setattr(pipeline, "load_scorer", lambda *a, **k: pytest.fail("the model was loaded first"))
    for extra, message in (
        ([], f"{out} already exists; pass --resume to continue it, --overwrite to replace it"),
        (["--out", str(tmp_path / "t.csv"), "--save-embeddings", str(emb)], f"{emb} already exists; pass --overwrite"),
        (["--out", str(tmp_path / "t.csv"), "--save-aligned", str(crops)], "already holds crops"),
    ):
        assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), *extra) == 1
        assert message in capsys.readouterr().err
    assert out.read_text() == "id,quality,error\n" and emb.read_bytes() == b"taken"


def test_hostile_file_names_are_written_safely_and_resume_without_duplicates(tiny_checkpoint, tmp_path):
    # A name that is not UTF-8, names with line breaks and names a spreadsheet would run: one row each, a valid
    # UTF-8 CSV, and a --resume that finds every row done (it used to crash at the first such name, every time).
    root = tmp_path / "faces"
    root.mkdir()
    names = [b"bad_\xff.png", b"cr\rname.png", b"ls\xe2\x80\xa8name.png", b"=HYPERLINK(1).png", b"-1.png", b"ok.png"]
    for raw, face in zip(names, smooth_faces(len(names), seed=3), strict=True):
        with open(os.path.join(os.fsencode(root), raw), "wb") as f:
            f.write(_png(face))
    out = tmp_path / "s.csv"
    assert run(tiny_checkpoint, "--images", str(root), "--out", str(out)) == 0
    text = out.read_bytes().decode("utf-8")
    ids = [r.id for r in output.read_results(out)]
    assert sorted(ids) == sorted(output.render_id(os.fsdecode(n)) for n in names)
    assert "bad_\\xff.png" in ids and "'=HYPERLINK(1).png," in text and '"cr\rname.png"' in text
    before = out.read_bytes()
    assert run(tiny_checkpoint, "--images", str(root), "--out", str(out), "--resume") == 0
    assert out.read_bytes() == before  # every row was found done: nothing scored twice


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tiny_checkpoint, folder, tmp_path, capsys, monkeypatch):
    import errno

    real_open = open

    def full_npy(file, *args, **kwargs):  # the disk fills up while the .npy is written
        if str(file).endswith(".tmp.npy"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, *args, **kwargs)

    out, emb = tmp_path / "s.csv", tmp_path / "e.npy"
    argv = ["--images", str(folder), "--out", str(out), "--save-embeddings", str(emb)]
    monkeypatch.setattr(output, "open", full_npy, raising=False)
    assert run(tiny_checkpoint, *argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    full = (
        f"error: cannot write {emb}: the disk is full (No space left on device); free space, then rerun with --resume."
    )
    assert err[-1] == full
    assert not any("Traceback" in line for line in err)
    assert not list(tmp_path.glob("*.tmp.npy")) and (tmp_path / "e.npy.partial").exists()
    monkeypatch.undo()
    assert run(tiny_checkpoint, *argv, "--resume") == 0
    assert len(output.read_results(out)) == 13 and np.load(emb).shape[0] == 13
    assert not (tmp_path / "e.npy.partial").exists()


def test_a_csv_saved_by_an_editor_resumes_to_one_row_per_input(tiny_checkpoint, folder, tmp_path):
    # Opened and saved on Windows: a byte-order mark, CRLF line ends and a blank last line; then half the rows.
    reference = tmp_path / "ref.csv"
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(reference)) == 0
    lines = reference.read_text().splitlines()
    out = tmp_path / "s.csv"
    out.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines[: 1 + len(lines) // 2] + ["", ""]).encode())
    assert run(tiny_checkpoint, "--images", str(folder), "--out", str(out), "--resume") == 0
    got, want = output.read_results(out), output.read_results(reference)
    assert [(r.id, r.error) for r in got] == [(r.id, r.error) for r in want]  # one row per input, none twice
    np.testing.assert_array_max_ulp(
        np.array([r.quality for r in got], np.float32), np.array([r.quality for r in want], np.float32), 4
    )
