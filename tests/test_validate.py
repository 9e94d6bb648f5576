"""The shared argument checks: one wording per mistake (TypeError: type, ValueError: value)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from pagedkv import _tensor_checks
from pagedkv._validate import (
    check_bool,
    check_callable,
    check_int,
    check_number,
    check_optional_number,
    check_path,
    check_str,
)


def test_check_int():
    assert check_int(3, "n") == 3 and check_int(0, "n", minimum=0) == 0
    with pytest.raises(TypeError, match=r"^n must be an int, got bool \(True\)$"):
        check_int(True, "n")
    with pytest.raises(TypeError, match=r"n must be an int, got float \(2.0\)"):
        check_int(2.0, "n")
    with pytest.raises(ValueError, match=r"^KVPool: n must be >= 1, got 0$"):
        check_int(0, "n", minimum=1, who="KVPool")


def test_check_number_and_optional_number():
    assert check_number(2, "t") == 2.0 and isinstance(check_number(2, "t"), float)
    with pytest.raises(TypeError, match="t must be a positive number of seconds, got str"):
        check_number("1", "t", positive=True, unit="seconds")
    with pytest.raises(ValueError, match="t must be a number, got nan"):
        check_number(math.nan, "t")
    with pytest.raises(ValueError, match="must be a positive number, got 0"):
        check_number(0, "t", positive=True)
    with pytest.raises(TypeError):
        check_number(False, "t")
    assert check_optional_number(None, "t") is None
    with pytest.raises(ValueError, match=r"t must be a positive number or None, got -1"):
        check_optional_number(-1, "t", positive=True)


def test_check_bool_str_callable():
    assert check_bool(False, "flag") is False
    with pytest.raises(TypeError, match=r"flag must be True or False, got int \(1\)"):
        check_bool(1, "flag")
    assert check_str("x", "name") == "x"
    with pytest.raises(TypeError, match="name must be a str, got bytes"):
        check_str(b"x", "name")
    assert check_callable(print, "cb", "() -> None") is print
    with pytest.raises(TypeError, match=r"cb must be callable \(int\) -> None, got int"):
        check_callable(5, "cb", "(int) -> None")


def test_check_path(tmp_path):
    assert check_path(tmp_path, "path") == str(tmp_path)
    assert check_path("rel", "path") == os.path.abspath("rel")
    assert check_path(Path("a") / "b", "path") == os.path.abspath("a/b")
    with pytest.raises(TypeError, match=r"path must be a path \(str or os.PathLike\), got bytes"):
        check_path(b"/tmp", "path")
    with pytest.raises(ValueError, match="non-empty path"):
        check_path("", "path")
    with pytest.raises(ValueError, match="without NUL"):
        check_path("a\0b", "path")


def test_block_ids():
    cpu = torch.device("cpu")
    ids = _tensor_checks.block_ids([3, 1], 4, cpu)
    assert ids.dtype == torch.int64 and ids.tolist() == [3, 1]
    assert _tensor_checks.block_ids(torch.tensor([0], dtype=torch.int32), 1, cpu).tolist() == [0]
    assert _tensor_checks.block_ids([], 4, cpu).numel() == 0
    with pytest.raises(ValueError, match=r"block_ids out of range: ids must lie in \[0, 4\)"):
        _tensor_checks.block_ids([4], 4, cpu)
    with pytest.raises(ValueError, match="got min -1"):
        _tensor_checks.block_ids([-1, 2], 4, cpu)
    with pytest.raises(TypeError, match="int32 or int64 tensor, got torch.float32"):
        _tensor_checks.block_ids(torch.zeros(2), 4, cpu)
    with pytest.raises(ValueError, match="must be 1-D"):
        _tensor_checks.block_ids(torch.zeros(2, 2, dtype=torch.int64), 4, cpu)
    with pytest.raises(TypeError, match="table must be a sequence of ints or an int tensor"):
        _tensor_checks.block_ids(7, 4, cpu, "table")
    with pytest.raises(TypeError, match="sequence of ints"):
        _tensor_checks.block_ids(["a"], 4, cpu)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        _tensor_checks.tensor([1], "x")
