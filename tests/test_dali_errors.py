"""Which DALI errors are a file's fault. DALI's operators name samples in messages that have nothing to do with a
file ("out of bounds for sample #3"): such an error is raised as what it is (DaliOperatorError, with the operator
it came from), never blamed on a good file, and never makes --skip-bad-files drop one. A file that really does not
decode still takes the bad-file path (tests/test_faults_data.py), and rebuilds after bad files are bounded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")

from convnext_fast.data import DatasetError, build_loader, scan_folder  # noqa: E402
from convnext_fast.data import dali as D  # noqa: E402
from convnext_fast.data import dali_faults as F  # noqa: E402
from convnext_fast.data.dali_faults import DaliOperatorError, error_origin  # noqa: E402

from test_faults_data import garbled_pixels  # noqa: E402

KW = dict(train=True, img_size=32, batch_size=4, backend="dali", device="cpu", num_workers=1, randaugment=None)
# DALI 2.4's own wording (seen from fn.crop / fn.decoders.image on this version), and the pre-1.2x one.
OPERATOR_MSG = ("Critical error in pipeline:\nError in GPU operator `nvidia.dali.fn.warp_affine`,\nwhich was used in "
                "the pipeline definition with the following traceback:\n\n  File \"x.py\", line 1, in p\n\n"
                "encountered:\n\nindex 9 is out of bounds for sample #1\nCurrent pipeline object is no longer valid.")
DECODER_MSG = ("Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`,\nwhich was "
               "used in the pipeline definition with the following traceback:\n\nencountered:\n\nFailed to decode "
               "sample #1 : nvJPEG status 6\nCurrent pipeline object is no longer valid.")


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.jpg")
    return tmp_path / "data"


def _failing_graph(monkeypatch):
    """The real graph, then an operator that fails the batch naming sample #3 (as DALI's operators do)."""
    real = D._graph

    def boom(*batch):
        raise IndexError("index 40 is out of bounds for sample #3")

    def graph(cfg, dev, cached=None):
        from nvidia.dali import fn

        return fn.python_function(real(cfg, dev, cached), function=boom, batch_processing=True)
    monkeypatch.setattr(D, "_graph", graph)


@pytest.mark.parametrize("skip", [False, True], ids=["strict", "skip-bad-files"])
def test_operator_error_naming_a_sample_is_not_blamed_on_a_good_file(root, tmp_path, monkeypatch, skip):
    _failing_graph(monkeypatch)
    log = tmp_path / "bad_files.txt"
    ld = build_loader(root, skip_bad=skip, bad_files_log=log, **KW)
    with pytest.raises(DaliOperatorError) as info:
        list(ld)
    ld.close()
    msg = str(info.value)
    assert not isinstance(info.value, DatasetError)  # not "cannot decode <good file>", not a user error
    assert "CPU operator nvidia.dali.fn.python_function" in msg and "out of bounds for sample #3" in msg
    assert "not a bad file" in msg and isinstance(info.value.__cause__, RuntimeError)  # DALI's own error
    assert not log.exists()  # nothing dropped


def test_error_origin_reads_both_dali_wordings():
    assert error_origin(OPERATOR_MSG) == "GPU operator nvidia.dali.fn.warp_affine"
    assert error_origin(DECODER_MSG) == "MIXED operator nvidia.dali.fn.decoders.image"
    assert error_origin("Error when executing Mixed operator ImageDecoder, instance name: \"x\", encountered:") \
        == "Mixed operator ImageDecoder"
    assert error_origin("Assert on \"IsDenseTensor()\" failed") is None


def test_which_file_a_dali_error_blames(root):
    """Files of the batch in flight all decode: only the decoder's own "sample #1" blames file 1; another
    operator's does not. A file of the batch that does not decode on its own is blamed whatever the operator."""
    ld = build_loader(root, **KW)
    paths = [p for p, _ in scan_folder(root).samples[:4]]
    ld._pending.append((0, paths, np.zeros(4, np.int64)))
    assert ld._decode_error(RuntimeError(DECODER_MSG)).path == paths[1]
    op = ld._decode_error(RuntimeError(OPERATOR_MSG))
    assert isinstance(op, DaliOperatorError) and "GPU operator nvidia.dali.fn.warp_affine" in str(op)
    with open(paths[2], "rb") as f:
        data = f.read()
    with open(paths[2], "wb") as f:
        f.write(garbled_pixels(data))
    bad = ld._decode_error(RuntimeError(OPERATOR_MSG))
    assert isinstance(bad, DatasetError) and bad.path == paths[2]
    ld.close()


def test_rebuilds_after_bad_files_are_bounded_per_epoch(root, tmp_path, monkeypatch):
    index = scan_folder(root)
    for k in (1, 6):  # two files go bad after the preflight; one rebuild allowed
        path = index.samples[k][0]
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(garbled_pixels(data))
    monkeypatch.setattr(F, "MAX_RESTARTS_PER_EPOCH", 1)
    ld = build_loader(index, skip_bad=True, bad_files_log=tmp_path / "bad.txt", **KW)
    with pytest.raises(DatasetError, match="stopping after 1 rebuilds"):
        list(ld)
    ld.close()
