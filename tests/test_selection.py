import pytest

from vitnt_jax.selection import parse_blocks


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("0-19", tuple(range(20))),
        ("0,2,4", (0, 2, 4)),
        ("-4:", (20, 21, 22, 23)),
        (":3", (0, 1, 2)),
        ("0:24:8", (0, 8, 16)),
        ("-1", (23,)),
        ("-3--1", (21, 22, 23)),
        ("all", tuple(range(24))),
        (None, tuple(range(24))),
        ("", tuple(range(24))),
        ("20-23,0", (0, 20, 21, 22, 23)),
        (" 1 , 3-4 ", (1, 3, 4)),
        ([5, -1, 0], (0, 5, 23)),
    ],
)
def test_parse_blocks(spec, expected):
    assert parse_blocks(spec, 24) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("5,5", "lists block 5 twice"),
        ("0-3,2", "lists block 2 twice"),
        ("24", "names block 24, but the model has 24 blocks"),
        ("-25", "names block -25"),
        ("0-30", "names block 30"),
        ("7-3", "runs backwards"),
        ("x", "cannot read block selection"),
        ("1:2:3:4", "cannot read block selection"),
        ("::0", "cannot read block selection"),
        ("3:3", "selects no block"),
    ],
)
def test_parse_blocks_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_blocks(spec, 24)
