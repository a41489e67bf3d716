import pickle

from msk.core.errors import QuarantineError, QuarantineReason


def test_quarantine_error_survives_pickling():
    """Raised inside Ray workers, it must cross the process boundary intact."""
    err = pickle.loads(pickle.dumps(QuarantineError("corrupt", "pixel data too short", "a/b.dcm")))
    assert (err.reason, err.detail, err.source) == (QuarantineReason.CORRUPT, "pixel data too short", "a/b.dcm")
    assert str(err) == "a/b.dcm: corrupt: pixel data too short"
