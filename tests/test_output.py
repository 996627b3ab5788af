"""Result files: parts of a multi-process run merge into one table (and its arrays) row for row."""

import numpy as np
import pytest

from vitnt_jax import output


@pytest.mark.parametrize("fmt", ["csv", "reference"])
def test_merge_keeps_ids_with_line_breaks_and_carriage_returns(tmp_path, fmt):
    # File names may hold any character but '/': a row is a CSV record, not a text line. The reference format
    # cannot quote, so it holds no line break (refused) but keeps spaces and formula characters as they are.
    if fmt == "csv":
        ids = [["a.png", "b\rc.png", "d\u2028e.png"], ["f\x0cg.png", "h.png", "i\nj.png", "=1+2.png", "'k.png"]]
    else:
        ids = [["a.png", "b c.png", " d.png "], ["=1+2.png", "h.png", "'k.png", "-l.png\t"]]
    out, emb = tmp_path / "s.out", tmp_path / "e.npy"
    for k, part in enumerate(ids):
        writer = output.ResultWriter(
            output.part_path(out, k, 2), fmt=fmt, arrays={"embedding": (output.part_path(emb, k, 2), (2,))}
        )
        writer.write([output.Row(i, 0.5) for i in part], {"embedding": np.ones((len(part), 2), np.float32) * k})
        writer.close(True)
    assert output.merge_parts(out, 2, fmt, [emb]) == sum(map(len, ids))
    assert [r.id for r in output.read_results(out, fmt)] == [i for part in ids for i in part]
    np.testing.assert_array_equal(np.load(emb)[:, 0], [k for k, part in enumerate(ids) for _ in part])


def test_a_resumed_csv_reads_back_ids_with_carriage_returns(tmp_path):
    path, ids = tmp_path / "s.csv", ["a\rb.png", "c\r\nd.png", 'e",f.png', "g.png"]
    writer = output.ResultWriter(path)
    writer.write([output.Row(i, 0.25, None, "") for i in ids])
    writer.close(True)
    assert output.ResultWriter(path, resume=True).done_ids == ids
    assert path.read_bytes().count(b"\n") == 1 + 4 + 1  # the header, one per row, and the quoted '\r\n'


def test_a_csv_that_csv_cannot_read_is_one_sentence(tmp_path):
    path = tmp_path / "s.csv"
    path.write_bytes(b"id,quality,error\nb\rc,0.5,\n")
    with pytest.raises(output.OutputError, match=r"s.csv is not a valid CSV \(.*\); choose a new out\.$"):
        output.ResultWriter(path, resume=True)
