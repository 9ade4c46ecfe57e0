"""metrics.py: the progress bar's switch (the JSONL log is tested with training, in test_train.py)."""

import pytest

from gptlab.metrics import bars_disabled, progress_bar


@pytest.mark.parametrize("value, off", [(None, False), ("", False), ("0", False), ("false", False),
                                        ("1", True), ("True", True)])
def test_tqdm_disable_turns_the_training_bar_off(monkeypatch, value, off):
    if value is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", value)
    assert bars_disabled() is off
    with progress_bar(10, 0, enabled=True) as bar:
        assert bar.disable is off
    with progress_bar(10, 0, enabled=False) as bar:
        assert bar.disable  # not rank 0: never a bar
